"""The dashboard: FastAPI REST, WebSocket live stream and the web page."""
