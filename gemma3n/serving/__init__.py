"""An OpenAI-compatible HTTP server over the generation engine, with continuous batching.

`scheduler.py`: the engine loop (requests join and leave a batch of KV-cache slots between decode
steps); `protocol.py`: requests checked, OpenAI's errors; `answer.py`: token ids to text, stop
strings, response objects; `app.py`: the endpoints (FastAPI, uvicorn). Run it with `gemma3n serve`.
"""
