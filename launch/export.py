"""Export the trained encoders from a DeepSpeed checkpoint (any ZeRO stage).

    python launch/export.py --checkpoint runs/demo/pretrain --out runs/demo/export
    python launch/export.py --checkpoint runs/x/checkpoints --tag step_000500 --out runs/x/export_500
    python launch/export.py --checkpoint runs/x/checkpoints/step_000500 --out exp \\
        --manifest /data/shards/manifest.json

Writes image_encoder/ (timm-loadable safetensors + config.json), cell_encoder/ (weights, config,
vocabulary, technology mean) and a README.md model card; see pretrain/export/. Overrides (key=value)
apply to the run config saved with the checkpoint (or to --config) and are checked against
pretrain.config.PretrainConfig before anything is read or written.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import run_entry  # noqa: E402
from pretrain.export import main as export_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or one tag folder")
    parser.add_argument("--out", required=True, help="export folder (replaced atomically if it exists)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    parser.add_argument("--config", default=None, help="run config to use instead of the one saved with the checkpoint")
    parser.add_argument("--manifest", default=None, help="shard manifest (default: the config's data.manifest)")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing embeddings")
    parser.add_argument(
        "--license", default="other", help="Hugging Face licence id for the model card (default: other)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = parser.parse_args()
    return run_entry(
        lambda: export_main(
            args.checkpoint,
            args.out,
            tag=args.tag,
            config=args.config,
            manifest=args.manifest,
            overrides=args.overrides,
            verify=not args.no_verify,
            license=args.license,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
