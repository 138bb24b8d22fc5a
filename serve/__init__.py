"""The HTTP server of ``crossmetric serve``: embedding and search routes, dynamic batching, the search page."""
