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
The model runs in a second process (the engine), so that reading and preparing requests here
never slows generation down.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
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
    parser.add_argument("--prepare-threads", type=int, default=None,
                        help="threads that read and prepare requests (decode images, tokenize) (default: 1 when the "
                             "model runs on CPU, whose cores the engine needs; 4 otherwise, to decode large images "
                             "side by side)")
    parser.add_argument("--max-delay-s", type=float, default=0.05,
                        help="how long a batch that is not full waits for requests already arriving (never otherwise)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads for generation (default: torch's, one per core)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)

    from serve.process import EngineProcess, EngineSpec

    # SIGTERM ends the server as Ctrl-C does: uvicorn finishes open requests, then the engine stops.
    signal.signal(signal.SIGTERM, _exit)
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    spec = EngineSpec(args.model, args.device, args.dtype, args.threads, args.max_batch_size, args.max_delay_s)
    # Started before torch and transformers are imported here: both processes import them at once.
    engine = EngineProcess(spec, args.max_waiting)
    server = None
    try:
        import uvicorn
        from transformers import AutoProcessor

        import eve  # noqa: F401  (Auto registration)
        from serve.api import build_app
        from serve.messages import Limits

        sock = _bind(args.host, args.port)  # before the model loads: a taken port is told in seconds, not minutes
        info = engine.wait_ready(AutoProcessor.from_pretrained(args.model))
        threads = args.prepare_threads or (1 if info["device"] == "cpu" else 4)
        app = build_app(engine, name, Limits(max_images=args.max_images), args.template, args.max_tokens, threads)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
        engine.on_exit = lambda: setattr(server, "should_exit", True)
        print(f"eve-serve: {name} ({info['device']}) on http://{args.host}:{args.port} (page at /, API at /v1)", flush=True)
        server.run(sockets=[sock])
    except (KeyboardInterrupt, SystemExit):
        pass
    except (OSError, RuntimeError) as e:  # the port, the model or its processor
        sys.exit(f"eve-serve: {e}")
    finally:
        engine.close()
    if engine.died:
        sys.exit(f"eve-serve: the engine process stopped (exit code {engine.exitcode}); see above")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"could not serve on {host}:{port}: {e.strerror}") from e
    return sock


def _exit(*_) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
