"""ct-ssl-hub: self-supervised CT encoders, fine-tuning, export and serving.

The umbrella package holds only what every stage shares: typed errors (`cthub.errors`), runtime helpers
(`cthub.runtime`) and the `cthub` command line (`cthub.cli`). Stages live in their own top-level packages:
`ctdata`, `hub`, `pretrain`, `finetune`, `export`, `serving`.
"""

__version__ = "0.1.0"
