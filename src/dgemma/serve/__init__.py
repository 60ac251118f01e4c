"""An OpenAI-compatible HTTP API over the continuous-batching scheduler: `dgemma serve`.

`app` builds the FastAPI app and its routes; `jobs` turns a request body into scheduler requests (limits,
sampler settings, seeds); `respond` runs them and answers with JSON or server-sent events; `output` turns
committed canvases into text; `infill` builds the starting canvas for `suffix`; `protocol` holds the request
schemas and response shapes; `errors` the OpenAI-style errors; `middleware` the API key, body limit and
request metrics; `metrics` the Prometheus metrics; `cli` the command. Importing this package imports
nothing (the `serve` extra is only needed to run the server).
"""
