"""Reports: where the energy went, as tables, files and charts."""
