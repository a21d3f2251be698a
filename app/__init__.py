"""clipsearch app: the online side (search service, demo) and the root `clipsearch` command."""
