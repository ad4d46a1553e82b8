"""Write docs/depths.json: what each standard depth setting trains on the studies' eight backbones
(random init; the block structure does not depend on the weights). scripts/gen_config_docs.py
renders it into docs/strategies.md. Rerun after changing blocks(), layers() or a strategy:

    PYTHONPATH=src python scripts/gen_depth_table.py && PYTHONPATH=src python scripts/gen_config_docs.py
"""

from __future__ import annotations

import json
from pathlib import Path

from medtune.models.backbones import create_backbone
from medtune.training.strategies import PEFT_DEPTHS, STANDARD_DEPTHS, depth, parse_label

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ["vgg16", "vgg19", "resnet50", "resnet101", "inception_v3", "densenet121", "resnetv2_50",
             "efficientnet_lite0"]


def main() -> None:
    table = {}
    for name in BACKBONES:
        model = create_backbone(name, pretrained=False, num_classes=2)
        table[name] = [{**depth(parse_label(label), model), "strategy": label}
                       for label in (*STANDARD_DEPTHS, *PEFT_DEPTHS)]
        print(name)
    (ROOT / "docs" / "depths.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
