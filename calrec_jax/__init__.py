"""CALRec (contrastive alignment of generative LLMs), built on seqrec_jax. Work in progress."""
