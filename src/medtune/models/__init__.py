"""Networks and what sits on them: backbones and their weights, adapters (PEFT), the heads fitted on
features, the convex probe."""
