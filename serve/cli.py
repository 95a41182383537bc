"""eve-serve: an OpenAI-compatible server for an EVE model, with a browser page.

    eve-serve runs/demo/final                      # http://127.0.0.1:8000 (the page), /v1/chat/completions
    eve-serve MODEL --port 9000 --max-batch-size 16

From Python, with the `openai` package:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="final", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}},
        {"type": "text", "text": "What is in the picture?"}]}])

Images travel as base64 data URLs; the server fetches nothing. Requests wait in one queue and
run in batches of up to --max-batch-size; answers are greedy unless a request sets temperature.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="EVE checkpoint folder (e.g. runs/demo/final) or hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder's name)")
    parser.add_argument("--template", default=None, help="chat template: vicuna_v1, eve_v1 or plain (default: the model's)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests generated together")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which the server answers 503")
    parser.add_argument("--max-tokens", type=int, default=512, help="answer length when a request does not set max_tokens")
    parser.add_argument("--max-images", type=int, default=8, help="images one request may hold")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads for generation (default: torch's, one per core)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)

    import uvicorn

    from serve.api import build_app
    from serve.engine import Engine
    from eve.pretrained import load_pretrained
    from serve.messages import Limits

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, processor = load_pretrained(args.model, args.device, args.dtype)
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    engine = Engine(model, processor, args.max_batch_size, args.max_waiting)
    app = build_app(engine, name, Limits(max_images=args.max_images), args.template, args.max_tokens)
    # HTTP in a thread, generation in the main thread (see Engine.serve_forever for why)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))

    def run_http() -> None:
        try:
            server.run()
        finally:  # stopped, or never started (the port taken): generation stops too
            engine.close()

    http = threading.Thread(target=run_http, name="eve-serve-http", daemon=True)
    http.start()
    stop = lambda *_: engine.close()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"eve-serve: {name} on http://{args.host}:{args.port} (page at /, API at /v1)", flush=True)
    engine.serve_forever()
    server.should_exit = True
    http.join(timeout=10)
    if not server.started:
        sys.exit(f"eve-serve: could not serve on {args.host}:{args.port} (see above)")


if __name__ == "__main__":
    main()
