"""WebSocket streaming: the per-stream session, its wire protocol, audio framing and client."""
