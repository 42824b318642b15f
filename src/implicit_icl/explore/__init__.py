"""`implicit-icl explore`: a local web app over the library. server (the FastAPI app and uvicorn), api (what
each endpoint computes, as JSON-ready dicts), inputs (the requests, checked), static/ (the page: plain JS and SVG)."""
