"""The BentoML entry point: `bentoml serve serving.entry:CTHubService` (what `cthub serve` runs, and what
bentofile.yaml names). BentoML imports it in its arbiter, then in each worker, so importing it is the
server's start-up: it sets the process environment the workers inherit, gives Gradio a private upload
directory, reads the settings and declares the services from them (`serving.service.build_services`).
Nothing else imports it.

Telemetry is off unless the operator says otherwise, before BentoML, Gradio or ONNX Runtime read it.
MALLOC_ARENA_MAX: the workers inherit the arbiter's environment; with one glibc arena per thread the API
worker's 32 request threads fragment memory and its RSS kept growing under load (~60 kB per request,
measured), with 2 arenas it levels off. Gradio's upload/cache directory is set before Gradio is imported
(some of its modules create files on import): private to this user, removed on exit.
"""

from __future__ import annotations

import os

from serving.settings import PROCESS_ENV_DEFAULTS, ServeSettings  # light: os and dataclasses only

for _name, _value in PROCESS_ENV_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

from serving.viewer import private_upload_dir  # noqa: E402 -- the libraries below read the environment

private_upload_dir()

from serving.service import build_services  # noqa: E402 -- Gradio and BentoML after the upload directory

CTHubService = build_services(ServeSettings.from_env())
