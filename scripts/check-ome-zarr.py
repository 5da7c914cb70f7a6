#!/usr/bin/env python3
"""Opens a unet3d Zarr output with the zarr Python package and checks its OME-Zarr 0.5 metadata:
every multiscales image (the store's own and each label image under `labels/`) lists datasets
that exist as arrays with one axis per declared axis and a scale of that many entries, each level
no larger than the one before; a label image's source, when given, is a group with multiscales.
With ome-zarr-models installed, the groups are also validated by its models of the 0.5 spec.
Opt-in (not part of CI):

    python3 -m venv venv && venv/bin/pip install zarr ome-zarr-models
    venv/bin/python scripts/check-ome-zarr.py OUT/predictions.zarr
"""
import os
import sys

import zarr


def check_images(group, name):
    ome = group.attrs.get("ome", {})
    images = ome.get("multiscales", [])
    if images:
        assert ome["version"] == "0.5", (name, ome["version"])
    for image in images:
        axes = image["axes"]
        assert all(a["type"] == "space" for a in axes), axes
        previous = None
        for d in image["datasets"]:
            array = group[d["path"]]
            scale = [t for t in d["coordinateTransformations"] if t["type"] == "scale"][0]["scale"]
            assert array.ndim == len(axes) == len(scale), (d["path"], array.shape, axes, scale)
            if previous is not None:
                assert all(a <= b for a, b in zip(array.shape, previous)), (d["path"], array.shape, previous)
            previous = array.shape
            print(f"{name}{image['name']}: {d['path']} {array.shape} {array.dtype}, scale {scale} "
                  f"{[a.get('unit', '') for a in axes]}, values {array[:].min()}..{array[:].max()}")
    return len(images)


def main(path):
    group = zarr.open_group(path, mode="r")
    n = check_images(group, "")
    if "labels" in group:
        labels = group["labels"]
        assert labels.attrs["ome"]["version"] == "0.5"
        for name in labels.attrs["ome"]["labels"]:
            label = labels[name]
            n += check_images(label, f"labels/{name}: ")
            source = label.attrs["ome"]["image-label"].get("source", {}).get("image")
            if source is not None:
                image = zarr.open_group(os.path.normpath(os.path.join(path, "labels", name, source)), mode="r")
                assert image.attrs["ome"]["multiscales"], source
                print(f"labels/{name}: labels the image at {source}")
    validate(path, group)
    print(f"{path}: OME-Zarr 0.5, {n} images, opened by zarr {zarr.__version__}")


def validate(path, group):
    try:
        from ome_zarr_models.v05.image import Image
        from ome_zarr_models.v05.image_label import ImageLabel
        from ome_zarr_models.v05.labels import Labels
    except ImportError:
        print("ome-zarr-models not installed: skipping its validation")
        return
    if group.attrs.get("ome", {}).get("multiscales"):
        Image.from_zarr(group)
    if "labels" in group:
        Labels.from_zarr(group["labels"])
        for name in group["labels"].attrs["ome"]["labels"]:
            ImageLabel.from_zarr(group["labels"][name])
    print(f"{path}: valid OME-Zarr 0.5 by ome-zarr-models")


if __name__ == "__main__":
    main(sys.argv[1])
