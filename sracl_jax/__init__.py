"""SRA-CL (semantic retrieval augmented contrastive learning), built on seqrec_jax. Work in progress."""
