"""The data-plane worker process: listeners, proxies and their connection pools."""
