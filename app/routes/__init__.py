"""HTTP routers, one per resource: search, embed, items, health (and the search page)."""
