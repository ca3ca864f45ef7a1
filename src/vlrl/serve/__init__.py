"""An OpenAI-compatible chat-completions server for a local model (`vlrl serve`).

`serve.app.create_app(engine, limits)` builds the FastAPI app; `serve.server.run_server(ServeConfig)` loads a
model folder and runs it under uvicorn on 127.0.0.1 by default. Images arrive inline as data URLs only; requests
must be JSON, address this server in `Host` and come from no other web origin; `stream: true` answers with
server-sent events; a client that disconnects stops its generation.
"""
