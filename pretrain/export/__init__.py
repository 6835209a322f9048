"""Export the trained PAST encoders from a DeepSpeed checkpoint (any ZeRO stage) for downstream use.

    python launch/export.py --checkpoint <run or checkpoint folder> --out <export folder>

One job per module:

- :mod:`~pretrain.export.consolidate`: find the checkpoint, gather DeepSpeed's fp32 weights (``zero_to_fp32``);
- :mod:`~pretrain.export.write`: write ``image_encoder/``, ``cell_encoder/``, ``export.json``, the
  training config (folder layout in its docstring) and verify the files against the training model;
- :mod:`~pretrain.export.card`: the ``README.md`` model card, from ``card_template.md``;
- :mod:`~pretrain.export.load`: the runtime loaders, :func:`load_image_encoder` and
  :func:`load_cell_encoder`, and :class:`ImageEncoder`, the one inference wrapper for image encoders.

Plain timm reproduces the backbone features::

    cfg = json.load(open("image_encoder/config.json"))
    model = timm.create_model(cfg["architecture"], **cfg["model_args"], num_classes=0)
    model.load_state_dict(safetensors.torch.load_file("image_encoder/model.safetensors"), strict=True)

(or ``timm.create_model("local-dir:<out>/image_encoder", pretrained=True)``). ``load_image_encoder``
adds the normalisation and the projection head (``.embed`` = ``PASTModel.encode_image``) and
``load_cell_encoder`` the whole cell tower with its vocabulary (``forward`` = ``PASTModel.encode_cell``).
"""

from .card import render_model_card
from .consolidate import CheckpointLocation, consolidate_state_dict, find_checkpoint, split_training_state
from .load import (
    CELL_DIR,
    CONFIG_NAME,
    EXPORT_FORMAT_VERSION,
    IMAGE_DIR,
    PROJECTION_NAME,
    TECH_MEAN_NAME,
    VOCAB_JSON_NAME,
    VOCAB_NAME,
    WEIGHTS_NAME,
    ImageEncoder,
    PretrainedCellEncoder,
    build_cell_tower,
    check_which,
    load_cell_encoder,
    load_image_encoder,
    load_timm_encoder,
)
from .write import (
    cell_encoder_config,
    export_checkpoint,
    image_encoder_config,
    load_run_config,
    main,
    verify_export,
    write_image_encoder,
)

__all__ = [
    "CELL_DIR",
    "CONFIG_NAME",
    "EXPORT_FORMAT_VERSION",
    "IMAGE_DIR",
    "PROJECTION_NAME",
    "TECH_MEAN_NAME",
    "VOCAB_JSON_NAME",
    "VOCAB_NAME",
    "WEIGHTS_NAME",
    "CheckpointLocation",
    "ImageEncoder",
    "PretrainedCellEncoder",
    "build_cell_tower",
    "cell_encoder_config",
    "check_which",
    "consolidate_state_dict",
    "export_checkpoint",
    "find_checkpoint",
    "image_encoder_config",
    "load_cell_encoder",
    "load_image_encoder",
    "load_run_config",
    "load_timm_encoder",
    "main",
    "render_model_card",
    "split_training_state",
    "verify_export",
    "write_image_encoder",
]
