"""`python -m ffscale.engine.to_universal ARGS`: DeepSpeed's `ds_to_universal` with every torch.load
weights-only. ds_to_universal unpickles each shard with `weights_only=False`
(deepspeed 0.19.8, deepspeed/checkpoint/ds_to_universal.py:186, 270, 713, 827-831, ...), so a
planted file would run code in the conversion; here torch refuses anything but tensors, containers
and DeepSpeed's checkpoint types (ffscale/engine/ckpt_engine.py). Same arguments as DeepSpeed's.
"""

from __future__ import annotations

from ffscale.engine.ckpt_engine import force_weights_only

if __name__ == "__main__":
    force_weights_only()
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(ds_to_universal.parse_arguments())
