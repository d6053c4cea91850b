"""Parity with the DIR Caffe release (Gordo et al.'s ``deep_retrieval``):
its ResNet-101 R-MAC network is written here as Caffe would hold it, a
``.prototxt`` in the release's layout and a ``.caffemodel`` encoded by hand
on the protobuf wire (no code shared with the library's reader), with
random weights and batch-norm statistics gathered on real photographs. The
reference descriptor is computed in torch with Caffe's semantics (stride on
the 1x1 convolutions, stored BatchNorm statistics divided by their scale
factor, separate Scale layers, ceil-mode pooling, BGR mean-subtracted
input), the release's ``test.py`` grid in floating point, Fast R-CNN's ROI
pooling loop and the release's Normalize / Aggregate layers."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from deep_retrieval.data import photos  # noqa: E402
from deep_retrieval.io import caffe_model  # noqa: E402
from deep_retrieval.model import published  # noqa: E402
from tests import reference  # noqa: E402
from tests.helpers_protobuf import field as _field  # noqa: E402
from tests.helpers_protobuf import varint as _varint  # noqa: E402

BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
STAGES = ((2, 3, 64), (3, 4, 128), (4, 23, 256), (5, 3, 512))  # ResNet-101


# --- the network as Caffe layers ---------------------------------------------------------------------------------

def _network(stages=STAGES):
    """``[(name, type, bottoms, tops, settings)]`` of MSRA's ResNet in the
    release's order, then its R-MAC head."""
    layers = []

    def conv(name, bottom, out, kernel, stride=1, pad=0):
        layers.append((name, "Convolution", [bottom], [name], dict(num_output=out, kernel_size=kernel, pad=pad,
                                                                   stride=stride, bias_term=False)))
        suffix = name[len("res"):] if name.startswith("res") else "_" + name
        layers.append((f"bn{suffix}", "BatchNorm", [name], [name], {}))
        layers.append((f"scale{suffix}", "Scale", [name], [name], {}))

    def relu(name, blob):
        layers.append((name, "ReLU", [blob], [blob], {}))

    conv("conv1", "data", 64, 7, 2, 3)
    relu("conv1_relu", "conv1")
    layers.append(("pool1", "Pooling", ["conv1"], ["pool1"], dict(kernel_size=3, stride=2)))
    blob = "pool1"
    for stage, count, planes in stages:
        names = "abc" if count == 3 else ["a"] + [f"b{i}" for i in range(1, count)]
        for i, block in enumerate(names):
            prefix = f"res{stage}{block}"
            stride = 2 if i == 0 and stage > 2 else 1
            shortcut = blob
            if i == 0:
                conv(f"{prefix}_branch1", blob, planes * 4, 1, stride)
                shortcut = f"{prefix}_branch1"
            conv(f"{prefix}_branch2a", blob, planes, 1, stride)
            relu(f"{prefix}_branch2a_relu", f"{prefix}_branch2a")
            conv(f"{prefix}_branch2b", f"{prefix}_branch2a", planes, 3, 1, 1)
            relu(f"{prefix}_branch2b_relu", f"{prefix}_branch2b")
            conv(f"{prefix}_branch2c", f"{prefix}_branch2b", planes * 4, 1)
            layers.append((prefix, "Eltwise", [shortcut, f"{prefix}_branch2c"], [prefix], {}))
            relu(f"{prefix}_relu", prefix)
            blob = prefix
    return layers


def _prototxt(layers, python_normalize=True, extra_head=""):
    def normalize(name, bottom):
        if python_normalize:
            return (f'layer {{\n  name: "{name}"\n  type: "Python"\n  bottom: "{bottom}"\n  top: "{name}"\n'
                    "  python_param {\n    module: 'custom_layers'\n    layer: 'NormalizeLayer'\n  }\n}\n")
        return f'layer {{\n  name: "{name}"\n  type: "Normalize"\n  bottom: "{bottom}"\n  top: "{name}"\n}}\n'

    out = ['name: "ResNet-101"\ninput: "data"\ninput_shape{\ndim: 1\ndim: 3\ndim: 224\ndim: 224\n}\n'
           'input: "rois"\ninput_shape{\ndim: 1\ndim: 1\ndim: 1\ndim: 5\n}\n']
    for name, kind, bottoms, tops, settings in layers:
        text = f'layer {{\n\tname: "{name}"\n\ttype: "{kind}"\n'
        text += "".join(f'\tbottom: "{b}"\n' for b in bottoms) + "".join(f'\ttop: "{t}"\n' for t in tops)
        if kind == "Convolution":
            text += "\tconvolution_param {\n" + "".join(
                f"\t\t{k}: {str(v).lower()}\n" for k, v in settings.items()) + "\t}\n"
        elif kind == "BatchNorm":
            text += "\tbatch_norm_param {\n\t\tuse_global_stats: true\n\t}\n"
        elif kind == "Scale":
            text += "\tscale_param {\n\t\tbias_term: true\n\t}\n"
        elif kind == "Pooling":
            text += "\tpooling_param {\n\t\tkernel_size: 3\n\t\tstride: 2\n\t\tpool: MAX\n\t}\n"
        out.append(text + "}\n")
    out.append('layer {\n  name: "pooled_rois"\n  type: "ROIPooling"\n  bottom: "res5c"\n  bottom: "rois"\n'
               '  top: "pooled_rois"\n  roi_pooling_param {\n    pooled_w: 1\n    pooled_h: 1\n'
               '    spatial_scale: 0.03125 # 1/32\n  }\n}\n')
    out.append(normalize("pooled_rois/normalized", "pooled_rois"))
    out.append('layer {\n  name: "pooled_rois/normalized_flat"\n  type: "Reshape"\n  reshape_param { shape { '
               'dim: 0 dim: 2048 dim: 1 dim: 1 } }\n  bottom: "pooled_rois/normalized"\n'
               '  top: "pooled_rois/normalized_flat"\n}\n')
    out.append('layer {\n  name: "pooled_rois/centered"\n  bottom: "pooled_rois/normalized_flat"\n'
               '  top: "pooled_rois/centered"\n  type: "Scale"\n  scale_param {\n    bias_term: true\n'
               '    filler { type: "constant" value: 1 }\n    bias_filler { type: "constant" value: 0 }\n  }\n}\n')
    out.append('layer {\n  name: "pooled_rois/pca"\n  type: "InnerProduct"\n  inner_product_param {\n'
               '    num_output: 2048\n    weight_filler { type: "xavier" }\n  }\n  bottom: "pooled_rois/centered"\n'
               '  top: "pooled_rois/pca"\n}\n')
    out.append('layer {\n  name: "pooled_rois/pca/reshaped"\n  type: "Reshape"\n  reshape_param { shape { dim: 0 '
               'dim: 0 dim: 1 dim: 1 } }\n  bottom: "pooled_rois/pca"\n  top: "pooled_rois/pca/reshaped"\n}\n')
    out.append(normalize("pooled_rois/pca/normalized", "pooled_rois/pca/reshaped"))
    out.append(extra_head)
    out.append('layer {\n  name: "rmac"\n  type: "Python"\n  bottom: "pooled_rois/pca/normalized"\n  top: "rmac"\n'
               "  python_param {\n    module: 'custom_layers'\n    layer: 'AggregateLayer'\n"
               '    param_str: "{}"\n  }\n}\n')
    out.append(normalize("rmac/normalized", "rmac"))
    return "\n".join(out)


# --- the caffemodel, on the protobuf wire ------------------------------------------------------------------------

def _blob(array, legacy=False):
    array = np.asarray(array, np.float32)
    if legacy:  # num, channels, height, width (fields 1-4, varints), 1-padded on the left
        dims = (1,) * (4 - array.ndim) + array.shape
        head = b"".join(_varint(i << 3) + _varint(d) for i, d in enumerate(dims, start=1))
    else:  # BlobShape (field 7) with its packed dims
        head = _field(7, _field(1, b"".join(_varint(d) for d in array.shape)))
    return head + _field(5, array.astype("<f4").tobytes())  # packed little-endian floats


def _caffemodel(path, blobs, legacy=()):
    with open(path, "wb") as f:
        f.write(_field(1, b"ResNet-101"))
        for name, arrays in blobs.items():
            kind = b"BatchNorm" if name.startswith("bn") else b"Layer"
            layer = [_field(1, name.encode()), _field(2, kind)] + [_field(7, _blob(a, name in legacy)) for a in arrays]
            f.write(_field(100, b"".join(layer)))


# --- the reference: torch with Caffe's semantics -----------------------------------------------------------------

def _random_weights(layers, seed):
    rng = np.random.default_rng(seed)
    blobs, channels = {}, {"data": 3}
    for name, kind, bottoms, tops, s in layers:
        if kind == "Convolution":
            fan_out = s["num_output"] * s["kernel_size"] ** 2
            blobs[name] = [rng.normal(0, math.sqrt(2 / fan_out),
                                      (s["num_output"], channels[bottoms[0]], s["kernel_size"], s["kernel_size"]))]
            channels[tops[0]] = s["num_output"]
        elif kind == "Scale":
            c = channels[bottoms[0]]
            blobs[name] = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c)]
        else:
            channels[tops[0]] = channels[bottoms[0]]
    blobs["pooled_rois/centered"] = [rng.uniform(0.8, 1.2, 2048), rng.normal(0, 0.02, 2048)]
    blobs["pooled_rois/pca"] = [rng.normal(0, 0.02, (2048, 2048)), rng.normal(0, 0.01, 2048)]
    return {k: [np.asarray(a, np.float32) for a in v] for k, v in blobs.items()}


def _trunk(x, layers, blobs, calibrate=False):
    """The trunk in torch, NCHW. With ``calibrate``, each BatchNorm first
    stores its input's statistics, times a scale factor of 999.98 as Caffe's
    moving averages are stored."""
    t = {"data": x}
    for name, kind, bottoms, tops, s in layers:
        y = t[bottoms[0]]
        if kind == "Convolution":
            y = F.conv2d(y, torch.from_numpy(blobs[name][0]), stride=s["stride"], padding=s["pad"])
        elif kind == "BatchNorm":
            if calibrate:
                factor = np.float32(999.98)
                mean, var = y.mean((0, 2, 3)).numpy(), y.var((0, 2, 3), unbiased=False).numpy()
                blobs[name] = [mean * factor, var * factor, np.array([factor], np.float32)]
            mean, var, factor = (torch.from_numpy(b) for b in blobs[name])
            y = (y - (mean / factor)[:, None, None]) / torch.sqrt((var / factor)[:, None, None] + 1e-5)
        elif kind == "Scale":
            gamma, beta = (torch.from_numpy(b) for b in blobs[name])
            y = y * gamma[:, None, None] + beta[:, None, None]
        elif kind == "ReLU":
            y = F.relu(y)
        elif kind == "Pooling":
            y = F.max_pool2d(y, 3, 2, ceil_mode=True)
        elif kind == "Eltwise":
            y = t[bottoms[0]] + t[bottoms[1]]
        t[tops[0]] = y
    return t["res5c"]


def _roi_pool(fmap, rois, stride=32):
    """Fast R-CNN's ROIPoolingLayer forward, one 1x1 bin: ``[R, C]``."""
    _, channels, height, width = fmap.shape
    out = torch.zeros(len(rois), channels)
    for r, roi in enumerate(rois):
        (w0, w1), (h0, h1) = (reference.caffe_roi_range(roi[i], roi[i + 2], stride, extent)
                              for i, extent in ((0, width), (1, height)))
        if h1 > h0 and w1 > w0:
            out[r] = fmap[0, :, h0:h1, w0:w1].amax(dim=(1, 2))
    return out


def _normalize(x):
    return x / (1e-8 + torch.sqrt((x ** 2).sum(1, keepdim=True)))  # custom_layers.NormalizeLayer


def _reference(images, layers, blobs):
    """The release's descriptor of each ``[H, W, 3]`` RGB image (one scale)."""
    shift_w, shift_b = (torch.from_numpy(b) for b in blobs["pooled_rois/centered"])
    pca_w, pca_b = (torch.from_numpy(b) for b in blobs["pooled_rois/pca"])
    out = []
    with torch.no_grad():
        for image in images:
            x = torch.from_numpy((image[..., ::-1] - BGR_MEAN).transpose(2, 0, 1).copy())[None]
            fmap = _trunk(x, layers, blobs)
            pooled = _normalize(_roi_pool(fmap, reference.dir_test_script_regions(*image.shape[:2])))
            whitened = _normalize((pooled * shift_w + shift_b) @ pca_w.T + pca_b)
            out.append(_normalize(whitened.sum(0, keepdim=True))[0].numpy())
    return np.stack(out)


def _photos(sizes):
    found = [p for p in photos.training_photos() if not p.cutout]
    return [np.asarray(found[3 + 5 * i].image().resize(size[::-1]), np.float32) for i, size in enumerate(sizes)]


def _cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``(folder, layers, blobs)``: the release's files with random weights,
    batch norms calibrated on photographs."""
    folder = tmp_path_factory.mktemp("deep_retrieval")
    layers = _network()
    blobs = _random_weights(layers, 0)
    with torch.no_grad():
        calibration = np.stack(_photos([(224, 288)] * 4))
        x = torch.from_numpy((calibration[..., ::-1] - BGR_MEAN).transpose(0, 3, 1, 2).copy())
        _trunk(x, layers, blobs, calibrate=True)
    (folder / "deploy_resnet101_normpython.prototxt").write_text(_prototxt(layers))
    _caffemodel(folder / "model.caffemodel", blobs, legacy={"bn_conv1", "scale5c_branch2c"})
    return folder, layers, blobs


def test_release_imports_with_its_descriptors_single_and_multi_resolution(release):
    """Landscape and portrait photographs whose pool1 input has odd and even
    ``H - 3`` (ceil mode's extra window, or not), single scale and the
    release's three resolutions summed."""
    folder, layers, blobs = release
    landscape = _photos([(240, 320), (240, 320)])
    portrait = _photos([(320, 226)])
    model, summary = published.import_checkpoint(str(folder / "model.caffemodel"), image_size=320, scales=(1.0,))
    assert summary["architecture"] == "resnet101" and summary["whitening_dim"] == 2048
    assert summary["prototxt"].endswith("deploy_resnet101_normpython.prototxt")
    for batch in (landscape, portrait):
        got = np.asarray(model(np.stack(batch)))
        want = _reference(batch, layers, blobs)
        assert _cosines(got, want).min() >= 0.9999, _cosines(got, want)

    multi, _ = published.import_checkpoint(str(folder / "model.caffemodel"), image_size=320)
    assert multi.config.scales == pytest.approx((550 / 800, 1.0, 1050 / 800))
    views = [_photos([(round(240 * s), round(320 * s))] * 2) for s in multi.config.scales]
    got = np.asarray(multi([np.stack(v) for v in views]))
    total = sum(_reference(v, layers, blobs) for v in views)  # test.py --multires: sum, then L2
    want = total / np.linalg.norm(total, axis=1, keepdims=True)
    assert _cosines(got, want).min() >= 0.9999, _cosines(got, want)


def test_release_exports_and_serves_its_descriptors(release, tmp_path):
    """Through export.export_saved_model (image sizes unknown to the graph:
    the grid is computed at run time) and the embedded TF Serving server."""
    from export import export_saved_model
    from tests.helpers_images import jpeg_bytes, reference_descriptors, served_descriptors

    folder, layers, blobs = release
    model, _ = published.import_caffe(str(folder / "deploy_resnet101_normpython.prototxt"),
                                      str(folder / "model.caffemodel"), image_size=256, scales=(1.0,))
    model.save(tmp_path / "dir.keras")
    info = export_saved_model.export(str(tmp_path / "dir.keras"), str(tmp_path / "models" / "dir" / "1"))
    assert info["descriptor_size"] == 2048
    files = jpeg_bytes(_photos([(240, 320), (300, 200)]))
    served = served_descriptors("dir", tmp_path / "models" / "dir", files)
    np.testing.assert_allclose(served, reference_descriptors(model, files, 256), atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("stride: 2\n\t\tbias_term: false\n\t}\n}\n\nlayer {\n\tname: \"bn3a_branch1\"",
                         "stride: 1\n\t\tbias_term: false\n\t}\n}\n\nlayer {\n\tname: \"bn3a_branch1\""),
     r"layer 'res3a_branch1' \(Convolution\) differs from the caffe_resnet101 trunk at stride: 1, expected 2"),
    (lambda t: t.replace('type: "Eltwise"', 'type: "Concat"', 1), r"layer 'res2a' \(Concat\): this layer type"),
    (lambda t: t.replace("layer: 'AggregateLayer'", "layer: 'MeanLayer'"),
     r"layer 'rmac' \(Python\): Python layer custom_layers.MeanLayer is not understood"),
    (lambda t: t.replace("spatial_scale: 0.03125", "spatial_scale: 0.0625"),
     r"layer 'pooled_rois': ROI pooling must .* spatial_scale 1/32"),
    (lambda t: t.replace("pool: MAX", "pool: MAX\n\t\tengine: CAFFE\n\t\tcolour: 3"), r":\d+:\d+ : .*colour"),
])
def test_what_the_reader_does_not_understand_is_refused_with_the_layer(release, tmp_path, edit, message):
    folder, _, _ = release
    text = (folder / "deploy_resnet101_normpython.prototxt").read_text()
    edited = edit(text)
    assert edited != text
    path = tmp_path / "deploy.prototxt"
    path.write_text(edited)
    with pytest.raises(caffe_model.CaffeError, match=message):
        published.import_caffe(str(path), str(folder / "model.caffemodel"))


def test_an_extra_head_layer_and_missing_weights_are_refused(release, tmp_path):
    folder, layers, blobs = release
    dropout = ('layer {\n  name: "drop"\n  type: "Python"\n  bottom: "pooled_rois/pca/normalized"\n'
               "  top: \"pooled_rois/pca/normalized\"\n  python_param { module: 'custom_layers' "
               "layer: 'NormalizeLayer' }\n}\n")
    (tmp_path / "extra.prototxt").write_text(_prototxt(layers, python_normalize=False, extra_head=dropout))
    with pytest.raises(caffe_model.CaffeError, match=r"layer 'drop' \(Normalize\): the R-MAC head must be"):
        published.import_caffe(str(tmp_path / "extra.prototxt"), str(folder / "model.caffemodel"))
    partial = {k: v for k, v in blobs.items() if k != "res4b17_branch2b"}
    _caffemodel(tmp_path / "partial.caffemodel", partial)
    with pytest.raises(ValueError, match="no weights for layer 'res4b17_branch2b'"):
        published.import_caffe(str(folder / "deploy_resnet101_normpython.prototxt"),
                               str(tmp_path / "partial.caffemodel"))


def test_the_release_by_name_from_its_archive(release, tmp_path, monkeypatch):
    """load_published("dir-caffe-resnet101-rmac") against a loopback server in
    NAVER LABS Europe's place: the archive is fetched into $KERAS_HOME's
    cache, its caffemodel and prototxts unpacked (the rest skipped), the
    model imported at the release's S = 800 and three resolutions; a second
    call needs no server."""
    import io
    import tarfile

    from deep_retrieval.published_presets import PUBLISHED
    from tests.helpers_http import serving

    folder, layers, blobs = release
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name in ("model.caffemodel", "deploy_resnet101_normpython.prototxt"):
            tar.add(folder / name, arcname=f"deep_retrieval/{name}")
        script = tarfile.TarInfo("deep_retrieval/test.py")
        script.size = 5
        tar.addfile(script, io.BytesIO(b"pass\n"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    entry = PUBLISHED["dir-caffe-resnet101-rmac"]
    assert entry["image_size"] == 800 and entry["layout"] == "caffe"
    with serving({"/deep_retrieval.tgz": archive.getvalue()}) as (url, state):
        monkeypatch.setitem(PUBLISHED, "dir-caffe-resnet101-rmac", dict(entry, url=url + "/deep_retrieval.tgz"))
        model, summary = published.load_published("dir-caffe-resnet101-rmac", image_size=256, progress=False)
        assert len(state.requests) == 1
    unpacked = tmp_path / "home" / "deep_retrieval" / "published" / "deep_retrieval.tgz.d" / "deep_retrieval"
    assert sorted(p.name for p in unpacked.iterdir()) == ["deploy_resnet101_normpython.prototxt", "model.caffemodel"]
    assert summary["file"] == str(unpacked / "model.caffemodel") and summary["levels"] == 2
    assert model.config.scales == pytest.approx((550 / 800, 1.0, 1050 / 800))
    again, _ = published.load_published("dir-caffe-resnet101-rmac", image_size=256, scales=(1.0,), progress=False)
    image = _photos([(192, 256)])
    assert _cosines(np.asarray(again(np.stack(image))), _reference(image, layers, blobs)).min() >= 0.9999
