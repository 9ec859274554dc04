"""Serving: the BentoML services (`serving.service`, started through `serving.entry:CTHubService`), the
analyses they answer with (`Analyzer`, shared with the PACS loop), the batched ONNX engine, the Gradio demo
and the SR and Parametric Map writers. Importing this package does not import BentoML, Gradio or highdicom.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch either."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
    from serving.analysis import Analyzer, Options, report_content
    from serving.inference import InferenceEngine, ServedModel, resolve_model_dir
    from serving.parametric_map import write_parametric_maps
    from serving.report import write_sr
    from serving.settings import ServeSettings

__getattr__, __all__ = lazy_package(__name__, __file__)
