"""ffscale: distributed training of feed-forward-only vision transformers and their ViT baselines.

The layers, from the entry points down (docs/architecture.md): `train.py` and `cli/`; `tools/`;
`run/`; `tracking/`; `inference/`; `engine/`; `data/`; `config.py`; `models/`; `util/` and
`errors.py`. A module imports only its own layer or layers below it.
"""
