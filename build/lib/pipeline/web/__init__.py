"""Web pages: a self-contained HTML report of heads, runs, studies and audits, and a classifying server."""
