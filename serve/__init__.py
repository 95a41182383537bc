"""Talking to an EVE model: `eve-chat` (terminal), `eve-serve` (an OpenAI-compatible HTTP server
with a browser page at `/`), and the pieces they share (prompts from chat messages, a batching
generation engine, incremental detokenisation)."""
