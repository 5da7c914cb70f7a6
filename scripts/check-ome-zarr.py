#!/usr/bin/env python3
"""Opens a unet3d Zarr output with the zarr Python package and checks its OME-Zarr 0.5 image
metadata: every multiscales image's datasets exist as arrays with one axis per declared axis,
and their scale has that many entries. Opt-in (not part of CI):

    python3 -m venv venv && venv/bin/pip install zarr
    venv/bin/python scripts/check-ome-zarr.py OUT/predictions.zarr
"""
import sys

import zarr


def main(path):
    group = zarr.open_group(path, mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5", ome["version"]
    for image in ome["multiscales"]:
        axes = image["axes"]
        assert all(a["type"] == "space" for a in axes), axes
        for d in image["datasets"]:
            array = group[d["path"]]
            scale = [t for t in d["coordinateTransformations"] if t["type"] == "scale"][0]["scale"]
            assert array.ndim == len(axes) == len(scale), (d["path"], array.shape, axes, scale)
            print(f"{image['name']}: {d['path']} {array.shape} {array.dtype}, scale {scale} "
                  f"{[a.get('unit', '') for a in axes]}, values {array[:].min()}..{array[:].max()}")
    print(f"{path}: OME-Zarr {ome['version']}, {len(ome['multiscales'])} images, opened by zarr {zarr.__version__}")


if __name__ == "__main__":
    main(sys.argv[1])
