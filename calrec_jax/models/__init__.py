"""CALRec's models: the decoder LM (`decoder`) and Hugging Face checkpoint conversion
(`convert`)."""

from calrec_jax.models.decoder import (Decoder, DecoderConfig, PRESETS, init_cache, preset,
                                       repeat_cache, stack_layers, unstack_layers)
