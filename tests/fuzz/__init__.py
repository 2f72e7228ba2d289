"""Fuzz targets and the long fuzz run (`make fuzz`); see targets.py and docs/erofs.md."""
