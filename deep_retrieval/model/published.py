"""The published retrieval networks (PyTorch, and the DIR paper's Caffe
release) as `DescriptorModel`s.

Two PyTorch checkpoint layouts are recognised, read with the torch-free reader
(`torch_checkpoint.load`, with numpy arrays and scikit-learn's ``PCA`` as plain
data through `pickled_data`):

- **cirtorch** (Radenović et al., ``cnnimageretrieval-pytorch``):
  ``{"meta", "state_dict"}``. The trunk is ``features.0`` (conv1),
  ``features.1`` (bn1) and ``features.4``-``features.7`` (layer1-4), GeM's
  power is ``pool.p``, learned whitening ``whiten.weight``/``whiten.bias``.
  The forward is ``L2(whiten(L2(gem(x))))``; scales ``1, 1/sqrt(2), 1/2``
  combine as the mean of ``v^p`` then the ``1/p`` power and L2, with ``p``
  GeM's power for models without learned whitening and 1 otherwise.
  Post-hoc whitening ``meta["Lw"][dataset]["ss" | "ms"] = {"m", "P"}`` is
  ``L2(P (x - m))`` after the scales.
- **dirtorch** (Revaud et al., naver's ``deep-image-retrieval``):
  ``{"state_dict", "model_options", "preprocess", "pca"}``, keys prefixed
  ``module.``. Torchvision names, GeM's power ``adpool.p``, an FC ``fc``;
  the forward is ``L2(fc(gem(x)))`` (``L2`` before ``fc`` with
  ``norm_features``). Scales combine as a generalised mean of power 3. The
  whitening of ``dirtorch/test_dir.py`` is the scikit-learn PCA's
  ``(x - mean_) components_^T / explained_variance_^0.25``, then L2.
  ``pooling="max"`` (Resnet101-TL-MAC) is global max-pooling, without
  ``adpool.p``.

cirtorch's VGG16 network keeps torchvision's ``features.N`` names
(`torchvision_vgg`); its descriptors are 512-D.

- **DIR Caffe** (Gordo et al.'s ``deep_retrieval`` release): a
  ``.prototxt`` and a ``.caffemodel`` (`deep_retrieval.io.caffe_model`).
  The trunk must be MSRA's ResNet layer for layer (`caffe_resnet`), then
  ROIPooling of the image's R-MAC grid (`PixelGridMaxPooling`), Normalize,
  the shift as a Scale with bias, the PCA as an InnerProduct, Normalize,
  the Aggregate (sum) and Normalize, with Reshapes between; anything else is
  refused with its layer named. Input is BGR minus the ImageNet mean
  (``caffe`` mode), images at S = 800 with L = 2, multi-resolution at
  S = 550, 800, 1050 summed (``test.py --multires``).

Both PyTorch families preprocess RGB / 255 with ImageNet's mean and std, the
``torch`` mode of `ImagePreprocessing`; a checkpoint with other statistics
is refused rather than approximated.
"""

import glob
import os

import numpy as np

from deep_retrieval.backbones import caffe_resnet, registry
from deep_retrieval.backbones.torchvision_resnet import BLOCKS, load_torch_state
from deep_retrieval.config import PAPER_SCALES, DescriptorConfig
from deep_retrieval.io import caffe_model, download, pickled_data, torch_checkpoint
from deep_retrieval.model.descriptor_model import build_descriptor_model
from deep_retrieval.published_presets import PUBLISHED

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIRTORCH_SCALES = (1.0, 2 ** -0.5, 0.5)
PCA_CLASSES = ("sklearn.decomposition._pca.PCA", "sklearn.decomposition.pca.PCA")
DIRTORCH_WHITENING_POWER = 0.25  # test_dir.py's --whitenp default
DIRTORCH_MULTISCALE_POWER = 3.0  # test_dir.py's --pooling gem --gemp 3
DIRTORCH_WHITENING = "Landmarks_clean"  # test_dir.py's --whiten default
CAFFE_IMAGE_SIZE, CAFFE_LEVELS = 800, 2  # test.py --S 800 --L 2, as the release was trained
CAFFE_PROTOTXTS = ("deploy_resnet101_normpython.prototxt", "deploy_resnet101.prototxt")
_CAFFE_HEAD = ("ROIPooling", "Normalize", "Scale", "InnerProduct", "Normalize", "Aggregate", "Normalize")


def read(path):
    """The checkpoint's object, tensors and arrays as numpy arrays."""
    return pickled_data.materialize(torch_checkpoint.load(path, pickled_data.globals_for(PCA_CLASSES)))


def layout(obj):
    """``"cirtorch"``, ``"dirtorch"`` or None."""
    if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) and "state_dict" in obj:
        return "cirtorch"
    if isinstance(obj, dict) and "state_dict" in obj and "model_options" in obj:
        return "dirtorch"
    return None


def fetch_published(name, progress=True):
    """The cached file of the published network ``name``, downloaded (with
    resume) and checked against its recorded SHA-256 when not cached yet.

    Returns:
        ``(path, sha256)``.

    Raises:
        ValueError: an unknown name (the message lists the names), or a
            `download.DownloadError` (offline: the URL to fetch by hand and
            where to put the file).
    """
    if name not in PUBLISHED:
        raise ValueError(f"unknown published network {name!r}; choose one of {', '.join(PUBLISHED)}")
    entry = PUBLISHED[name]
    path = os.path.join(download.cache_dir("published"), entry["file"])
    sha256 = download.fetch(entry["url"], path, entry["sha256"], progress=progress)
    if entry["layout"] == "caffe":
        folder = path + ".d"
        if not os.path.isdir(folder):
            download.extract(path, folder, keep=lambda member: member.endswith((".caffemodel", ".prototxt")),
                             progress=progress)
        found = sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.caffemodel"), recursive=True))
        if len(found) != 1:
            raise ValueError(f"{path}: the archive holds {len(found)} .caffemodel files, expected one")
        path = found[0]
    return path, sha256


def load_published(name, image_size=None, scales=None, whitening=None, progress=True):
    """A published network by name (`deep_retrieval.published_presets.PUBLISHED`), fetched
    into the cache if needed and imported as its publisher's test script
    describes images (scales, post-hoc whitening, image size), unless the
    arguments say otherwise.

    Example:
    >>> model, summary = load_published("Resnet101-AP-GeM")  # doctest: +SKIP

    Returns:
        ``(model, summary)``, as `import_checkpoint`, the summary with the
        name, the file's path and its SHA-256 added.
    """
    path, sha256 = fetch_published(name, progress)
    entry = PUBLISHED[name]
    model, summary = import_checkpoint(path, image_size or entry["image_size"], scales or entry["scales"],
                                       whitening or entry["whitening"])
    summary.update(name=name, file=path, sha256=sha256)
    return model, summary


def import_checkpoint(path, image_size=None, scales=None, whitening=None, prototxt=None):
    """A `DescriptorModel` with the weights of a cirtorch or dirtorch file,
    or of the DIR Caffe release.

    Args:
        path: the ``.pth``/``.pt`` checkpoint, or a ``.caffemodel``.
        image_size: the longest side images are described at (default: 1024,
            at which both PyTorch families evaluate Oxford and Paris; 800,
            the DIR release's S).
        scales: relative scales (default: cirtorch's ``1, 1/sqrt(2), 1/2``;
            dirtorch's single scale; DIR's 550, 800, 1050 over 800).
        whitening: which post-hoc whitening to apply when the checkpoint
            holds several (cirtorch ``Lw`` / dirtorch ``pca`` keys); None
            takes the only one, ``"none"`` applies none.
        prototxt: the ``.caffemodel``'s network (default: the release's
            deploy prototxt beside it).

    Returns:
        ``(model, summary)``: the model and a dict describing what was read.
    """
    if str(path).endswith(".caffemodel"):
        if whitening not in (None, "none"):
            raise ValueError(f"{path}: a Caffe model has no post-hoc whitening to choose ({whitening!r})")
        return import_caffe(prototxt or _beside(path), path, image_size or CAFFE_IMAGE_SIZE, scales)
    if prototxt is not None:
        raise ValueError(f"{path}: a prototxt goes with a .caffemodel only")
    image_size = image_size or 1024
    obj = read(path)
    kind = layout(obj)
    if kind == "cirtorch":
        return _cirtorch(path, obj, image_size, scales, whitening)
    if kind == "dirtorch":
        return _dirtorch(path, obj, image_size, scales, whitening)
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: not a cirtorch ({{'meta', 'state_dict'}}) or dirtorch ({{'state_dict', "
                     f"'model_options', ...}}) checkpoint; found keys {keys}")


def _check_preprocessing(path, mean, std):
    if not (np.allclose(mean, IMAGENET_MEAN, atol=1e-4) and np.allclose(std, IMAGENET_STD, atol=1e-4)):
        raise ValueError(f"{path}: normalises with mean {list(mean)} and std {list(std)}; only ImageNet's "
                         f"{list(IMAGENET_MEAN)} / {list(IMAGENET_STD)} are supported")


def _choose(path, options, wanted, what, default=None):
    """One entry of ``options`` (a dict name -> value) by ``wanted``; None
    takes ``default`` if present, else the only one."""
    if wanted == "none" or not options:
        return None, None
    if wanted is None and default in options:
        wanted = default
    if wanted is None:
        if len(options) > 1:
            raise ValueError(f"{path}: holds {what} {sorted(options)}: choose one with --whitening")
        wanted = next(iter(options))
    if wanted not in options:
        raise ValueError(f"{path}: no {what} {wanted!r}; it holds {sorted(options)}")
    return wanted, options[wanted]


def _depth(path, architecture, vgg=False):
    name = str(architecture).replace("_rmac", "")
    known = sorted(BLOCKS) + (["vgg16"] if vgg else [])
    if name not in known:
        raise ValueError(f"{path}: architecture {architecture!r} is not one of {', '.join(known)}")
    return name


def _finish(path, config, image_size, state, head, post=None):
    """Builds the model, loads trunk, GeM, FC and post-hoc whitening."""
    model = build_descriptor_model(config, image_size)
    unused = load_torch_state(model.backbone, state, path)
    unused = [k for k in unused if not k.endswith("num_batches_tracked") and k not in head.values()]
    if unused:
        raise ValueError(f"{path}: tensors this model does not use: {', '.join(unused[:8])}")
    gem = model.head
    if not gem.mac:
        gem.pooling.p.assign(np.float32(np.ravel(state[head["p"]])[0]))
    if gem.fc is not None:
        gem.fc.set_weights([np.asarray(state[head["weight"]], np.float32).T,
                            np.asarray(state[head["bias"]], np.float32)])
    if post is not None:
        mean, kernel = post
        model.post_whitening.set_pca(mean, kernel)
    return model


def _cirtorch(path, obj, image_size, scales, whitening):
    meta, raw = obj["meta"], obj["state_dict"]
    if meta.get("pooling") != "gem" or meta.get("regional") or meta.get("local_whitening"):
        raise ValueError(f"{path}: cirtorch model with pooling {meta.get('pooling')!r}, regional "
                         f"{meta.get('regional')}, local whitening {meta.get('local_whitening')}: only "
                         "global GeM models are supported")
    _check_preprocessing(path, meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD))
    depth = _depth(path, meta.get("architecture"), vgg=True)
    stages = {} if depth == "vgg16" else {
        "features.0": "conv1", "features.1": "bn1", "features.4": "layer1", "features.5": "layer2",
        "features.6": "layer3", "features.7": "layer4"}
    state = {}
    for key, value in raw.items():
        head, _, rest = key.partition(".")
        prefix, _, tail = rest.partition(".")
        name = f"{head}.{prefix}"
        state[f"{stages[name]}.{tail}" if name in stages else key] = value
    learned = "whiten.weight" in state
    scales = tuple(scales or CIRTORCH_SCALES)
    p = float(np.ravel(state["pool.p"])[0])
    name, lw = _choose(path, meta.get("Lw") or {}, whitening, "post-hoc whitenings (meta['Lw'])")
    post = None
    if lw is not None:
        entry = lw["ms" if len(scales) > 1 else "ss"]
        m, projection = np.asarray(entry["m"], np.float32).ravel(), np.asarray(entry["P"], np.float32)
        post = (m, projection.T)
    out = state["whiten.weight"].shape[0] if learned else (512 if depth == "vgg16" else 2048)
    config = DescriptorConfig(
        backbone=f"torchvision_{depth}", weights=None, scales=scales, pooling="gem", gem_p=p,
        normalize_pooled=True, fc_dim=out if learned else None,
        multiscale_power=1.0 if learned or len(scales) == 1 else p,
        post_whitening_dim=None if post is None else post[1].shape[1],
    )
    model = _finish(path, config, image_size, state, {"p": "pool.p", "weight": "whiten.weight",
                                                       "bias": "whiten.bias"}, post)
    return model, {"layout": "cirtorch", "architecture": depth, "gem_p": p, "learned_whitening": learned,
                   "post_whitening": name, "scales": list(scales), "multiscale_power": config.multiscale_power}


def _dirtorch(path, obj, image_size, scales, whitening):
    options = obj["model_options"]
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj["state_dict"].items()}
    pooling = str(options.get("pooling", "gem"))
    if not (pooling.startswith("gem") or pooling == "max"):
        raise ValueError(f"{path}: dirtorch model with pooling {pooling!r}: only GeM ('gem') and MAC ('max') "
                         "are supported")
    if float(options.get("center_bias", 0) or 0) > 0:
        raise ValueError(f"{path}: dirtorch model with center_bias {options['center_bias']}: not supported")
    if options.get("without_fc") or "fc.weight" not in state:
        raise ValueError(f"{path}: a dirtorch model without its fc layer is not supported")
    preprocess = obj.get("preprocess") or {}
    _check_preprocessing(path, preprocess.get("mean", IMAGENET_MEAN), preprocess.get("std", IMAGENET_STD))
    depth = _depth(path, options.get("arch"))
    pcas = obj.get("pca")
    if isinstance(pcas, pickled_data.PlainObject):
        pcas = {"pca": pcas}
    name, pca = _choose(path, pcas or {}, whitening, "PCA whitenings (pca)", DIRTORCH_WHITENING)
    post = None
    if pca is not None:
        a = pca.attributes
        if not a.get("whiten", True):
            raise ValueError(f"{path}: the PCA {name!r} was fitted without whitening")
        components = np.asarray(a["components_"], np.float64)
        scale = np.power(np.asarray(a["explained_variance_"], np.float64), DIRTORCH_WHITENING_POWER)
        post = (np.asarray(a["mean_"], np.float32), (components.T / scale).astype(np.float32))
    scales = tuple(scales or (1.0,))
    mac = pooling == "max"
    p = None if mac else float(np.ravel(state["adpool.p"])[0])
    config = DescriptorConfig(
        backbone=f"torchvision_{depth}", weights=None, scales=scales, pooling="mac" if mac else "gem",
        gem_p=3.0 if mac else p,
        normalize_pooled=bool(options.get("norm_features", False)), fc_dim=state["fc.weight"].shape[0],
        multiscale_power=DIRTORCH_MULTISCALE_POWER if len(scales) > 1 else 1.0, multiscale_epsilon=1e-6,
        post_whitening_dim=None if post is None else post[1].shape[1],
    )
    model = _finish(path, config, image_size, state, {"p": "adpool.p", "weight": "fc.weight", "bias": "fc.bias"},
                    post)
    return model, {"layout": "dirtorch", "architecture": depth, "pooling": "mac" if mac else "gem", "gem_p": p,
                   "post_whitening": name,
                   "scales": list(scales), "multiscale_power": config.multiscale_power}


def _beside(path):
    folder = os.path.dirname(os.path.abspath(path))
    for name in CAFFE_PROTOTXTS:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ValueError(f"{path}: no {' or '.join(CAFFE_PROTOTXTS)} beside it; pass the network's prototxt")


def _caffe_depth(prototxt, names):
    for depth, marker in (("resnet152", "res4b35"), ("resnet101", "res4b22"), ("resnet50", "res4f")):
        if marker in names:
            return depth
    raise caffe_model.CaffeError(f"{prototxt}: not a ResNet-50/101/152 trunk in MSRA's naming (no res4f, res4b22 "
                                 "or res4b35 layer)")


def _check_caffe_trunk(prototxt, layers, depth):
    expected = caffe_resnet.caffe_layers(depth)
    for got, want in zip(layers, expected):
        if got != want:
            keys = [k for k in want if got.get(k) != want[k]] or sorted(set(got) - set(want))
            raise caffe_model.CaffeError(
                f"{prototxt}: layer {got['name']!r} ({got['type']}) differs from the caffe_{depth} trunk at "
                f"{', '.join(f'{k}: {got.get(k)!r}, expected {want.get(k)!r}' for k in keys)}")
    if len(layers) < len(expected):
        raise caffe_model.CaffeError(f"{prototxt}: ends after {len(layers)} layers, inside the caffe_{depth} trunk")


def _check_caffe_head(prototxt, head, stride):
    """The head's layers (Reshapes dropped) after the trunk, chained."""
    chained, blob = [], "res5c"  # the trunk's last blob
    for layer in head:
        if layer["bottom"][:1] != (blob,):
            raise caffe_model.CaffeError(f"{prototxt}: layer {layer['name']!r} ({layer['type']}) reads "
                                         f"{list(layer['bottom'])}, not the previous layer's {blob!r}")
        blob = layer["top"][0]
        if layer["type"] != "Reshape":
            chained.append(layer)
    kinds = tuple(layer["type"] for layer in chained)
    if kinds != _CAFFE_HEAD:
        bad = next((layer for layer, want in zip(chained, _CAFFE_HEAD) if layer["type"] != want), None)
        where = f"layer {bad['name']!r} ({bad['type']})" if bad else f"the head ends after {len(chained)} layers"
        raise caffe_model.CaffeError(f"{prototxt}: {where}: the R-MAC head must be {' -> '.join(_CAFFE_HEAD)} "
                                     "(with Reshapes between)")
    roi, _, shift, pca = chained[:4]
    if roi["bottom"][1:] != ("rois",) or roi["pooled"] != (1, 1) or abs(roi["spatial_scale"] * stride - 1) > 1e-6:
        raise caffe_model.CaffeError(f"{prototxt}: layer {roi['name']!r}: ROI pooling must take 'rois' into one "
                                     f"1x1 bin at spatial_scale 1/{stride}; it has {roi}")
    if not shift["bias"] or not pca["bias"]:
        raise caffe_model.CaffeError(f"{prototxt}: layers {shift['name']!r} and {pca['name']!r}: the shift and the "
                                     "PCA must both have a bias")
    return shift["name"], pca["name"], pca["num_output"]


def import_caffe(prototxt, caffemodel, image_size=CAFFE_IMAGE_SIZE, scales=None):
    """The DIR Caffe release (``prototxt`` structure, ``caffemodel``
    weights) as a `DescriptorModel` (see the module docstring).

    Returns:
        ``(model, summary)``, as `import_checkpoint`.
    """
    net = caffe_model.read_net(prototxt)
    try:
        layers = [caffe_model.describe(layer) for layer in net.layer]
    except caffe_model.CaffeError as e:
        raise caffe_model.CaffeError(f"{prototxt}: {e}") from None
    depth = _caffe_depth(prototxt, {layer["name"] for layer in layers})
    count = len(caffe_resnet.caffe_layers(depth))
    _check_caffe_trunk(prototxt, layers[:count], depth)
    shift, pca, dim = _check_caffe_head(prototxt, layers[count:], registry.SPECS[f"caffe_{depth}"].stride)
    blobs = caffe_model.read_blobs(caffemodel)
    scales = tuple(scales or PAPER_SCALES)
    config = DescriptorConfig(
        backbone=f"caffe_{depth}", weights=None, scales=scales, levels=CAFFE_LEVELS, include_global=False,
        regions="pixel_grid", whitening_dim=dim, whitening_bias=True, pooling="rmac", multiscale_power=1.0)
    model = build_descriptor_model(config, image_size)
    unused = caffe_resnet.load_caffe_blobs(model.backbone, depth, blobs, caffemodel)
    unused = [name for name in unused if name not in (shift, pca)]
    if unused:
        raise ValueError(f"{caffemodel}: weights of layers the prototxt does not use: {', '.join(unused[:8])}")
    for name, count in ((shift, 2), (pca, 2)):
        if len(blobs.get(name, ())) != count:
            raise ValueError(f"{caffemodel}: layer {name!r} needs {count} blobs, has {len(blobs.get(name, ()))}")
    (scale, shift_bias), (weight, bias) = blobs[shift], blobs[pca]
    scale, shift_bias, bias = np.ravel(scale), np.ravel(shift_bias), np.ravel(bias)
    weight = np.asarray(weight, np.float64).reshape(dim, -1)
    if weight.shape[1] != model.spec.channels or scale.size != weight.shape[1]:
        raise ValueError(f"{caffemodel}: layers {shift!r} / {pca!r} have shapes {scale.shape} / {weight.shape}; "
                         f"the trunk gives {model.spec.channels} channels")
    # (w * x + b) W^T + c = x (diag(w) W^T) + (b W^T + c)
    model.head.pca.set_pca(np.zeros(weight.shape[1], np.float32), (scale[:, None] * weight.T).astype(np.float32),
                           (shift_bias @ weight.T + bias).astype(np.float32))
    return model, {"layout": "caffe", "architecture": depth, "prototxt": str(prototxt), "levels": CAFFE_LEVELS,
                   "whitening_dim": dim, "scales": list(scales), "image_size": image_size}
