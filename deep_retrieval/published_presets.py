"""The published retrieval networks, by the names their publishers give them.

Each entry gives where the publisher serves the file (``url``), the name it
is cached under, its SHA-256 where the publisher records one, how the
publisher's own test script describes images with it (scales, post-hoc
whitening, image size) and the mAP (%) the publisher reports, with where
each fact comes from (``source``).

Checksums: cirtorch's file names end in the first 7 hex digits of the file's
SHA-256 (torch.hub's naming convention, which ``load_url(check_hash=True)``
verifies); that prefix is what is recorded. naver's Google Drive files and
the DIR Caffe archive come with no published checksum (``sha256`` None):
`load_published` prints the SHA-256 of what it fetched, for the user to
compare.

Results are ``{benchmark: value}`` with Revisited benchmarks as
``(medium, hard)``.
"""

_CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks"
_CIRTORCH_TEST = "filipradenovic/cnnimageretrieval-pytorch cirtorch/examples/test.py PRETRAINED"
_CIRTORCH_E2E = "filipradenovic/cnnimageretrieval-pytorch cirtorch/examples/test_e2e.py PRETRAINED"
_CIRTORCH_TABLE = "cnnimageretrieval-pytorch README.md: 'Our pretrained networks' table, PyTorch rows"
_CIRTORCH_E2E_TABLE = "cnnimageretrieval-pytorch README.md: end-to-end whitening table (multi-scale)"
_DIRTORCH = "naver/deep-image-retrieval README.md, 'Pre-trained models' table (Google Drive links)"
_DRIVE = "https://drive.usercontent.google.com/download?export=download&confirm=t&id="
_DIR_CAFFE = ("Gordo et al.'s deep_retrieval package, README.md 'Expected accuracy' (test.py --S 800 --L 2, "
              "--multires: 86.07 / 94.53; single scale 84.09 / 93.57); the archive's URL and its members "
              "deep_retrieval/model.caffemodel and deploy_resnet101*.prototxt as a public Dockerfile fetches them")
_TPAMI_SCALES = (1.0, 2 ** -0.5, 0.5)  # README: --multiscale '[1, 1/2**(1/2), 1/2]'
_E2E_SCALES = (1.0, 2 ** 0.5, 2 ** -0.5)  # README: --multiscale '[1, 2**(1/2), 1/2**(1/2)]'


def _cirtorch(folder, file, scales, whitening, results, table, source):
    return {"layout": "cirtorch", "url": f"{_CIRTORCH}/{folder}/{file}", "file": file,
            "sha256": file.rsplit("-", 1)[1].split(".")[0], "scales": scales, "whitening": whitening,
            "image_size": 1024, "results": results, "source": f"{source}; results: {table}"}


def _dirtorch(file, drive_id, results):
    return {"layout": "dirtorch", "url": _DRIVE + drive_id, "file": file, "sha256": None, "scales": (1.0,),
            "whitening": None, "image_size": 1024, "results": results,
            "source": f"{_DIRTORCH}; single scale, whitening Landmarks_clean (test_dir.py's default, which "
                      "import_checkpoint takes when the file holds it), --whitenp 0.25"}


PUBLISHED = {
    "retrievalSfM120k-vgg16-gem": _cirtorch(
        "retrieval-SfM-120k", "retrievalSfM120k-vgg16-gem-b4dcdc6.pth", _TPAMI_SCALES, "retrieval-SfM-120k",
        {"oxford5k": 87.3, "paris6k": 87.8, "roxford5k": (60.9, 32.9), "rparis6k": (69.3, 44.2)},
        _CIRTORCH_TABLE, _CIRTORCH_TEST),
    "retrievalSfM120k-resnet101-gem": _cirtorch(
        "retrieval-SfM-120k", "retrievalSfM120k-resnet101-gem-b80fb85.pth", _TPAMI_SCALES, "retrieval-SfM-120k",
        {"oxford5k": 88.2, "paris6k": 92.5, "roxford5k": (65.4, 40.1), "rparis6k": (76.7, 55.2)},
        _CIRTORCH_TABLE, _CIRTORCH_TEST),
    "rSfM120k-tl-resnet50-gem-w": _cirtorch(
        "retrieval-SfM-120k", "rSfM120k-tl-resnet50-gem-w-97bf910.pth", _E2E_SCALES, "none",
        {"roxford5k": (64.7, 39.0), "rparis6k": (76.3, 54.9)}, _CIRTORCH_E2E_TABLE, _CIRTORCH_E2E),
    "rSfM120k-tl-resnet101-gem-w": _cirtorch(
        "retrieval-SfM-120k", "rSfM120k-tl-resnet101-gem-w-a155e54.pth", _E2E_SCALES, "none",
        {"roxford5k": (67.8, 41.7), "rparis6k": (77.6, 56.3)}, _CIRTORCH_E2E_TABLE, _CIRTORCH_E2E),
    "rSfM120k-tl-resnet152-gem-w": _cirtorch(
        "retrieval-SfM-120k", "rSfM120k-tl-resnet152-gem-w-f39cada.pth", _E2E_SCALES, "none",
        {"roxford5k": (68.8, 41.3), "rparis6k": (78.0, 57.2)}, _CIRTORCH_E2E_TABLE, _CIRTORCH_E2E),
    "gl18-tl-resnet50-gem-w": _cirtorch(
        "gl18", "gl18-tl-resnet50-gem-w-83fdc30.pth", _E2E_SCALES, "none",
        {"roxford5k": (63.6, 40.9), "rparis6k": (78.0, 57.5)}, _CIRTORCH_E2E_TABLE, _CIRTORCH_E2E),
    "gl18-tl-resnet101-gem-w": _cirtorch(
        "gl18", "gl18-tl-resnet101-gem-w-a4d43db.pth", _E2E_SCALES, "none",
        {"roxford5k": (67.3, 44.3), "rparis6k": (80.6, 61.5)}, _CIRTORCH_E2E_TABLE, _CIRTORCH_E2E),
    "gl18-tl-resnet152-gem-w": _cirtorch(
        "gl18", "gl18-tl-resnet152-gem-w-21278d5.pth", _E2E_SCALES, "none",
        {"roxford5k": (68.7, 44.2), "rparis6k": (79.7, 60.3)}, _CIRTORCH_E2E_TABLE, _CIRTORCH_E2E),
    "dir-caffe-resnet101-rmac": {
        "layout": "caffe", "url": "http://download.europe.naverlabs.com/Computer-Vision-CodeandModels/deep_retrieval.tgz",
        "file": "deep_retrieval.tgz", "sha256": None, "scales": (550 / 800, 1.0, 1050 / 800), "whitening": None,
        "image_size": 800, "results": {"oxford5k": 86.07, "paris6k": 94.53}, "source": _DIR_CAFFE},
    "Resnet101-TL-MAC": _dirtorch(
        "Resnet101-TL-MAC.pt", "13MUGNwn_CYGZvqDBD8FGD8fVYxThsSDg",
        {"oxford5k": 85.6, "paris6k": 90.1, "roxford5k": (63.3, 35.7), "rparis6k": (76.6, 55.5)}),
    "Resnet101-TL-GeM": _dirtorch(
        "Resnet101-TL-GeM.pt", "1vhm1GYvn8T3-1C4SPjPNJOuTU9UxKAG6",
        {"oxford5k": 85.7, "paris6k": 93.4, "roxford5k": (64.5, 40.9), "rparis6k": (78.8, 59.2)}),
    "Resnet50-AP-GeM": _dirtorch(
        "Resnet50-AP-GeM.pt", "1oPtE_go9tnsiDLkWjN4NMpKjh-_md1G5",
        {"oxford5k": 87.7, "paris6k": 91.9, "roxford5k": (65.5, 41.0), "rparis6k": (77.6, 57.1)}),
    "Resnet101-AP-GeM": _dirtorch(
        "Resnet101-AP-GeM.pt", "1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy",
        {"oxford5k": 89.1, "paris6k": 93.0, "roxford5k": (67.1, 42.3), "rparis6k": (80.3, 60.9)}),
    "Resnet101-AP-GeM-LM18": _dirtorch(
        "Resnet101-AP-GeM-LM18.pt", "1r76NLHtJsH-Ybfda4aLkUIoW3EEsi25I",
        {"oxford5k": 88.1, "paris6k": 93.1, "roxford5k": (66.3, 42.5), "rparis6k": (80.2, 60.8)}),
}
