"""Parity with the PyTorch retrieval networks: a network in each layout,
built here in torch after the public code (cirtorch's ImageRetrievalNet,
dirtorch's ResNet_RMAC and test_dir.py), with random weights and batch-norm
statistics gathered on real photographs, saved with torch.save, imported,
gives torch's descriptor of real photographs."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from deep_retrieval.data import photos  # noqa: E402
from deep_retrieval.model import published  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class Bottleneck(nn.Module):
    """torchvision's (v1.5): the stride on the 3x3 convolution."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Trunk(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            layers = []
            for i in range(count):
                layers.append(Bottleneck(inplanes, planes, 2 if i == 0 and stage > 1 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{stage}", nn.Sequential(*layers))

    def stages(self):
        return [self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3, self.layer4]


def gem(x, p, eps=1e-6):
    return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p).flatten(1)


class Pool(nn.Module):
    def __init__(self, p=3.0):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)


class CirtorchNet(nn.Module):
    """cirtorch's ImageRetrievalNet: features (the trunk's children but the
    last two), GeM ``pool.p``, L2, learned ``whiten``, L2."""

    def __init__(self, trunk, whitening):
        super().__init__()
        self.features = nn.Sequential(*trunk.stages())
        self.pool = Pool(2.7)
        self.whiten = nn.Linear(2048, 2048) if whitening else None

    def forward(self, x):
        o = F.normalize(gem(self.features(x), self.pool.p), dim=1, eps=1e-6)
        return o if self.whiten is None else F.normalize(self.whiten(o), dim=1, eps=1e-6)


class DirtorchNet(nn.Module):
    """dirtorch's ResNet_RMAC: torchvision names, GeM ``adpool.p`` (or
    ``pooling="max"``: adaptive max-pooling, no parameter), ``fc``, L2."""

    def __init__(self, blocks, out_dim, pooling="gem"):
        super().__init__()
        trunk = Trunk(blocks)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(trunk, name))
        self.adpool = nn.AdaptiveMaxPool2d(1) if pooling == "max" else Pool(3.1)
        self.fc = nn.Linear(2048, out_dim)

    def forward(self, x):
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        pooled = self.adpool(x).flatten(1) if isinstance(self.adpool, nn.AdaptiveMaxPool2d) else gem(x, self.adpool.p)
        return F.normalize(self.fc(pooled), dim=-1)


def _photos(count=3, size=(224, 320)):
    """Real photographs (GCompris's), as float32 ``[N, H, W, 3]`` in 0..255."""
    found = [p for p in photos.training_photos() if not p.cutout]
    picked = [found[i * 7] for i in range(count)]
    return np.stack([np.asarray(p.image().resize(size[::-1]), np.float32) for p in picked])


def _torch_input(images):
    x = torch.from_numpy(images / 255.0).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _realistic(net, images, seed):
    """Random weights, then batch-norm statistics averaged over photographs
    in training mode (so activations keep a sane scale through 100 layers)."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # torchvision's
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.momentum = None  # a plain average over the passes
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.normal_(m.bias, 0.0, 0.01)
    net.train()
    with torch.no_grad():
        for image in images:
            net(_torch_input(image[None]))
    return net.eval()


def _resized(x, s):
    """``x`` at scale ``s``: bilinear, half-pixel centres, sides rounded half
    up. cirtorch passes ``scale_factor=s``, whose sampling grid differs by a
    fraction of a pixel: what is compared here is how scales combine."""
    if s == 1:
        return x
    size = [int(np.floor(d * s + 0.5)) for d in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("zip_format", [True, False])
def test_cirtorch_resnet101_gem_with_learned_whitening(tmp_path, zip_format):
    images = _photos()
    net = _realistic(CirtorchNet(Trunk((3, 4, 23, 3)), whitening=True), images, seed=0)
    meta = {"architecture": "resnet101", "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": True, "mean": MEAN, "std": STD, "outputdim": 2048}
    path = str(tmp_path / "gl18-tl-resnet101-gem-w.pth")
    torch.save({"meta": meta, "state_dict": net.state_dict()}, path, _use_new_zipfile_serialization=zip_format)
    model, summary = published.import_checkpoint(path, image_size=320)
    assert summary["layout"] == "cirtorch" and summary["learned_whitening"]
    assert summary["multiscale_power"] == 1.0  # learned whitening: the plain mean over scales
    with torch.no_grad():
        want = net(_torch_input(images)).numpy()
    got = np.asarray(model.single_scale(images))
    assert _cosines(got, want).min() >= 0.9999
    # Multi-scale, as cirtorch's extract_ms: resized copies, their mean, L2.
    with torch.no_grad():
        x = _torch_input(images)
        total = sum(net(_resized(x, s)) for s in published.CIRTORCH_SCALES)
        want = F.normalize(total / 3, dim=1).numpy()
    assert _cosines(np.asarray(model(images)), want).min() >= 0.9999


def test_cirtorch_gem_with_posthoc_whitening_lw(tmp_path):
    images = _photos()
    net = _realistic(CirtorchNet(Trunk((3, 4, 6, 3)), whitening=False), images, seed=1)
    rng = np.random.default_rng(2)
    lw = {k: {"m": rng.normal(0, 0.01, (2048, 1)), "P": rng.normal(0, 1, (2048, 2048)) / 45} for k in ("ss", "ms")}
    meta = {"architecture": "resnet50", "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": False, "mean": MEAN, "std": STD, "outputdim": 2048, "Lw": {"retrieval-SfM-120k": lw}}
    path = str(tmp_path / "retrievalSfM120k-resnet50-gem.pth")
    torch.save({"meta": meta, "state_dict": net.state_dict()}, path)
    model, summary = published.import_checkpoint(path, image_size=320)
    p = float(net.pool.p.detach())
    assert summary["post_whitening"] == "retrieval-SfM-120k" and summary["multiscale_power"] == pytest.approx(p)
    with torch.no_grad():
        x = _torch_input(images)
        total = sum(net(_resized(x, s)).pow(p) for s in published.CIRTORCH_SCALES)
        v = F.normalize((total / 3).pow(1 / p), dim=1).numpy().T
    # cirtorch's whitenapply: P (x - m), then L2 (columns are vectors).
    white = lw["ms"]["P"] @ (v - lw["ms"]["m"])
    want = (white / np.linalg.norm(white, axis=0, keepdims=True)).T
    assert _cosines(np.asarray(model(images)), want).min() >= 0.9999
    single, _ = published.import_checkpoint(path, image_size=320, scales=(1.0,))
    with torch.no_grad():
        v = net(_torch_input(images)).numpy().T
    white = lw["ss"]["P"] @ (v - lw["ss"]["m"])
    assert _cosines(np.asarray(single(images)), (white / np.linalg.norm(white, axis=0)).T).min() >= 0.9999
    none, summary = published.import_checkpoint(path, image_size=320, whitening="none")
    assert summary["post_whitening"] is None and none.post_whitening is None


class VggFeatures(nn.Module):
    """torchvision's ``vgg16().features`` without its last max-pooling, as
    cirtorch's ``init_network`` keeps it (``features.0`` ... ``features.29``)."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for entry in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, entry, 3, padding=1), nn.ReLU()]
                channels = entry
        self.features = nn.Sequential(*layers)

    def stages(self):
        return list(self.features.children())


def test_cirtorch_vgg16_gem_single_and_multi_scale(tmp_path):
    images = _photos()
    trunk = VggFeatures()
    net = CirtorchNet(trunk, whitening=False)
    torch.manual_seed(5)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.normal_(m.bias, 0.0, 0.05)
    net.eval()
    meta = {"architecture": "vgg16", "local_whitening": False, "pooling": "gem", "regional": False,
            "whitening": False, "mean": MEAN, "std": STD, "outputdim": 512}
    path = str(tmp_path / "retrievalSfM120k-vgg16-gem-b4dcdc6.pth")
    torch.save({"meta": meta, "state_dict": net.state_dict()}, path)
    model, summary = published.import_checkpoint(path, image_size=320)
    assert summary["architecture"] == "vgg16" and model.descriptor_size == 512
    with torch.no_grad():
        x = _torch_input(images)
        want = net(x).numpy()
        p = float(net.pool.p.detach())
        total = sum(net(_resized(x, s)).pow(p) for s in published.CIRTORCH_SCALES)
        want_ms = F.normalize((total / 3).pow(1 / p), dim=1).numpy()
    assert _cosines(np.asarray(model.single_scale(images)), want).min() >= 0.9999
    assert _cosines(np.asarray(model(images)), want_ms).min() >= 0.9999


def _fake_sklearn_pca(monkeypatch):
    """A class that pickles by reference as sklearn.decomposition._pca.PCA
    (scikit-learn itself is not needed, and is not installed here)."""
    module = types.ModuleType("sklearn.decomposition._pca")

    class PCA:
        pass

    PCA.__module__, PCA.__qualname__ = "sklearn.decomposition._pca", "PCA"
    module.PCA = PCA
    for name in ("sklearn", "sklearn.decomposition"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "sklearn.decomposition._pca", module)
    return PCA


def _dirtorch_checkpoint(path, images, monkeypatch):
    """A dirtorch-layout ResNet-50 (fc to 1024) with a 512-D PCA, saved at
    ``path``; returns ``(net, pca)``."""
    net = _realistic(DirtorchNet((3, 4, 6, 3), out_dim=1024), images, seed=3)
    rng = np.random.default_rng(4)
    pca = _fake_sklearn_pca(monkeypatch)()
    pca.n_components, pca.whiten, pca.svd_solver = None, True, "full"
    pca.mean_ = rng.normal(0, 0.01, 1024)
    pca.components_ = np.linalg.qr(rng.normal(size=(1024, 1024)))[0][:512]
    pca.explained_variance_ = np.sort(rng.uniform(1e-4, 1e-2, 512))[::-1]
    pca.noise_variance_, pca.n_components_ = np.float64(1e-5), np.int64(512)
    checkpoint = {"state_dict": {"module." + k: v for k, v in net.state_dict().items()},
                  "model_options": {"arch": "resnet50_rmac", "out_dim": 1024, "pooling": "gem", "gemp": 3},
                  "preprocess": {"mean": MEAN, "std": STD, "input_size": 224},
                  "pca": {"Landmarks_clean": pca}}
    torch.save(checkpoint, path)
    return net, pca


def test_dirtorch_module_prefixed_state_fc_and_pca_whitening(tmp_path, monkeypatch):
    images = _photos()
    path = str(tmp_path / "Resnet50-AP-GeM.pt")
    net, pca = _dirtorch_checkpoint(path, images, monkeypatch)
    model, summary = published.import_checkpoint(path, image_size=320)
    assert summary["layout"] == "dirtorch" and summary["post_whitening"] == "Landmarks_clean"
    with torch.no_grad():
        v = net(_torch_input(images)).numpy()
    # dirtorch/utils/common.py whiten_features with test_dir.py's whitenp 0.25.
    white = (v - pca.mean_) @ pca.components_.T / np.power(pca.explained_variance_, 0.25)
    want = white / np.linalg.norm(white, axis=1, keepdims=True)
    assert model.descriptor_size == 512
    assert _cosines(np.asarray(model(images)), want).min() >= 0.9999


def test_dirtorch_tl_mac_max_pooling_multiscale(tmp_path):
    """Resnet101-TL-MAC's layout: ``pooling="max"``, no ``adpool.p``; scales
    combined as test_dir.py does (generalised mean of power 3, then L2)."""
    images = _photos()
    net = _realistic(DirtorchNet((3, 4, 6, 3), out_dim=2048, pooling="max"), images, seed=6)
    path = str(tmp_path / "Resnet101-TL-MAC.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()},
                "model_options": {"arch": "resnet50_rmac", "out_dim": 2048, "pooling": "max"},
                "preprocess": {"mean": MEAN, "std": STD, "input_size": 224}}, path)
    model, summary = published.import_checkpoint(path, image_size=320, scales=(1.0, 0.5))
    assert summary["pooling"] == "mac" and summary["gem_p"] is None
    with torch.no_grad():
        x = _torch_input(images)
        single = net(x).numpy()
        # dirtorch/test_dir.py pool(..., 'gem', gemp=3): sign-preserving power mean.
        v = torch.stack([net(_resized(x, s)) for s in (1.0, 0.5)])
        sym = torch.sign(v) * (v * torch.sign(v)).clamp(min=1e-6).pow(3)
        m = sym.mean(0)
        want = F.normalize(torch.sign(m) * (m * torch.sign(m)).clamp(min=1e-6).pow(1 / 3), dim=-1).numpy()
    assert _cosines(np.asarray(model.single_scale(images)), single).min() >= 0.9999
    assert _cosines(np.asarray(model(images)), want).min() >= 0.9999
    options = {"arch": "resnet50_rmac", "pooling": "max", "center_bias": 0.5}
    torch.save({"state_dict": net.state_dict(), "model_options": options}, path)
    with pytest.raises(ValueError, match="center_bias"):
        published.import_checkpoint(path)


def test_unrecognised_files_list_their_keys_and_callables_are_refused(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"model": {}, "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"found keys \['epoch', 'model'\]"):
        published.import_checkpoint(path)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = str(tmp_path / "evil.pth")
    torch.save({"meta": {"pooling": "gem"}, "state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(ValueError, match="refused to load the global (posix|os).system"):
        published.import_checkpoint(evil)
    assert not marker.exists()


def test_import_command_writes_a_model_that_reloads(tmp_path):
    images = _photos(count=1)
    net = _realistic(DirtorchNet((3, 4, 6, 3), out_dim=256), images, seed=5)
    path = str(tmp_path / "dir.pt")
    torch.save({"state_dict": net.state_dict(), "model_options": {"arch": "resnet50_rmac", "pooling": "gem"}}, path)
    out = tmp_path / "dir.keras"
    done = subprocess.run([sys.executable, "-m", "export.import_checkpoint", "--checkpoint", path, "--output",
                           str(out), "--image_size", "320"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "descriptor size 256" in done.stdout
    import keras

    loaded = keras.models.load_model(out)
    assert loaded.image_size == 320 and loaded.config.pooling == "gem"
    with torch.no_grad():
        want = net(_torch_input(images)).numpy()
    assert _cosines(np.asarray(loaded(images)), want).min() >= 0.9999
    bad = subprocess.run([sys.executable, "-m", "export.import_checkpoint", "--checkpoint", str(tmp_path / "no.pt"),
                          "--output", str(tmp_path / "x.keras")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "no.pt: no such file, and not a published name (" in bad.stderr
    assert "Resnet101-TL-MAC" in bad.stderr


def test_published_names_download_once_verify_and_then_need_no_network(tmp_path, monkeypatch):
    """load_published against a loopback server in the publisher's place: the
    file is fetched into $KERAS_HOME's cache, checked, imported with the
    publisher's test settings; then found there with the server gone; a wrong
    recorded hash leaves nothing in the cache; the command takes the name."""
    import hashlib

    from deep_retrieval.io.download import DownloadError
    from deep_retrieval.published_presets import PUBLISHED
    from tests.helpers_http import serving

    images = _photos()
    source = str(tmp_path / "served.pt")
    net, pca = _dirtorch_checkpoint(source, images, monkeypatch)
    body = open(source, "rb").read()
    home = tmp_path / "home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    original = PUBLISHED["Resnet50-AP-GeM"]
    entry = dict(original, sha256=hashlib.sha256(body).hexdigest())
    with serving({"/Resnet50-AP-GeM.pt": body}) as (url, state):
        monkeypatch.setitem(PUBLISHED, "Resnet50-AP-GeM", dict(entry, url=url + "/Resnet50-AP-GeM.pt"))
        model, summary = published.load_published("Resnet50-AP-GeM", image_size=320, progress=False)
        assert len(state.requests) == 1
    cached = home / "deep_retrieval" / "published" / "Resnet50-AP-GeM.pt"
    assert summary["file"] == str(cached) and summary["sha256"] == entry["sha256"]
    assert summary["post_whitening"] == "Landmarks_clean" and summary["scales"] == [1.0]
    with torch.no_grad():
        v = net(_torch_input(images)).numpy()
    white = (v - pca.mean_) @ pca.components_.T / np.power(pca.explained_variance_, 0.25)
    want = white / np.linalg.norm(white, axis=1, keepdims=True)
    assert _cosines(np.asarray(model(images)), want).min() >= 0.9999
    again, _ = published.load_published("Resnet50-AP-GeM", image_size=320, progress=False)  # server gone
    assert _cosines(np.asarray(again(images)), want).min() >= 0.9999
    # The command by name, in another process, from the cache: naver's entries
    # record no hash, so the cached file is taken as it is.
    assert original["sha256"] is None
    out = tmp_path / "named.keras"
    env = dict(os.environ, KERAS_HOME=str(home))
    done = subprocess.run([sys.executable, "-m", "export.import_checkpoint", "--checkpoint", "Resnet50-AP-GeM",
                           "--output", str(out), "--image_size", "320"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"name": "Resnet50-AP-GeM"' in done.stdout and out.exists()
    # A file that does not match the recorded hash is refused and not kept.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "fresh"))
    with serving({"/Resnet50-AP-GeM.pt": body}) as (url, _):
        monkeypatch.setitem(PUBLISHED, "Resnet50-AP-GeM", dict(entry, url=url + "/Resnet50-AP-GeM.pt",
                                                               sha256="0" * 64))
        with pytest.raises(DownloadError, match="does not match the recorded"):
            published.load_published("Resnet50-AP-GeM", progress=False)
    assert os.listdir(tmp_path / "fresh" / "deep_retrieval" / "published") == []
    with pytest.raises(ValueError, match="unknown published network 'Resnet-9000'.*Resnet101-AP-GeM"):
        published.load_published("Resnet-9000")


def test_imported_model_exports_and_serves_its_descriptors(tmp_path, monkeypatch):
    """A dirtorch import through export.export_saved_model and the embedded
    TF Serving server: the gRPC answer is the Keras model's descriptor."""
    from export import export_saved_model
    from tests.helpers_images import jpeg_bytes, reference_descriptors, served_descriptors

    images = _photos()
    path = str(tmp_path / "Resnet50-AP-GeM.pt")
    _dirtorch_checkpoint(path, images, monkeypatch)
    model, _ = published.import_checkpoint(path, image_size=320)
    model.save(tmp_path / "imported.keras")
    base = tmp_path / "models" / "dir"
    info = export_saved_model.export(str(tmp_path / "imported.keras"), str(base / "1"))
    assert info["descriptor_size"] == 512
    blobs = jpeg_bytes(images)
    served = served_descriptors("dir", base, blobs)
    want = reference_descriptors(model, blobs, 320)
    assert served.shape == (3, 512)
    np.testing.assert_allclose(served, want, atol=1e-5)
