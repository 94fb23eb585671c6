"""The HTTP face of the runtime: an OpenAI-compatible server with continuous batching (`acd-serve`).

Layers, each thin over the one below: `Stepper` (runtime) -> `Scheduler` (a batch that requests
join and leave between steps) -> `create_app` (OpenAI routes, Starlette) -> uvicorn, or Ray Serve
replicas. Imports the runtime only, never torch. Needs `pip install "autocontrast[serve]"`.
"""
