"""The HTML report of a run folder: build (collect and lay out), html (the page), plots."""
