"""The Caffe reader: text and binary files written by hand here."""

import numpy as np
import pytest

from deep_retrieval.io import caffe_model
from tests.helpers_protobuf import field as _field
from tests.helpers_protobuf import varint as _varint

CONV = '''layer {
  name: "conv1"  type: "Convolution"  bottom: "data"  top: "conv1"
  param { lr_mult: 1 }
  convolution_param { num_output: 64 kernel_size: 7 pad: 3 stride: 2
                      weight_filler { type: "msra" } }
}
'''


def _layer(path, text):
    path.write_text(text)
    return caffe_model.read_net(str(path)).layer


def test_text_layers_with_caffe_defaults_applied(tmp_path):
    conv, = _layer(tmp_path / "a.prototxt", CONV)
    assert caffe_model.describe(conv) == {"name": "conv1", "type": "Convolution", "bottom": ("data",),
                                          "top": ("conv1",), "num_output": 64, "kernel": 7, "stride": 2, "pad": 3,
                                          "bias": True}  # Caffe's bias_term default
    bn, pool, add = _layer(tmp_path / "b.prototxt", '''
        layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
        layer { name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: MAX kernel_h: 3 kernel_w: 3 } }
        layer { name: "s" type: "Eltwise" bottom: "x" bottom: "y" top: "z" }''')
    assert caffe_model.describe(bn)["eps"] == 1e-5
    assert {k: caffe_model.describe(pool)[k] for k in ("kernel", "stride", "pad", "round_mode")} == {
        "kernel": 3, "stride": 1, "pad": 0, "round_mode": "CEIL"}
    assert caffe_model.describe(add)["operation"] == "SUM"


@pytest.mark.parametrize("text, message", [
    (CONV.replace("stride: 2", "stride: 2 group: 2"), r"layer 'conv1' \(Convolution\): group 2"),
    (CONV.replace("kernel_size: 7", "kernel_h: 7 kernel_w: 5"), r"layer 'conv1' .*kernel 7x5 is not square"),
    ('layer { name: "r" type: "ReLU" bottom: "x" top: "x" relu_param { negative_slope: 0.1 } }',
     r"layer 'r' \(ReLU\): negative_slope 0.1"),
    ('layer { name: "b" type: "BatchNorm" bottom: "x" top: "x" batch_norm_param { use_global_stats: false } }',
     r"layer 'b' \(BatchNorm\): use_global_stats: false"),
    ('layer { name: "l" type: "LRN" bottom: "x" top: "y" }', r"layer 'l' \(LRN\): this layer type is not"),
    ("layer { name: 'p' type: 'Python' python_param { module: 'evil' layer: 'Shell' } }",
     r"Python layer evil.Shell is not understood .*never run"),
    ('layer { name: "c" type: "Convolution" include { phase: TRAIN } }', r"layer 'c' .*phase rules"),
])
def test_settings_it_does_not_understand_are_refused_with_the_layer(tmp_path, text, message):
    layer, = _layer(tmp_path / "n.prototxt", text)
    with pytest.raises(caffe_model.CaffeError, match=message):
        caffe_model.describe(layer)


def test_unknown_fields_old_format_and_empty_files_are_refused_with_the_file(tmp_path):
    path = tmp_path / "x.prototxt"
    path.write_text(CONV.replace("stride: 2", "stride: 2 deformable: true"))
    with pytest.raises(caffe_model.CaffeError, match=r"x.prototxt:4:.*deformable"):
        caffe_model.read_net(str(path))
    path.write_text('layers { name: "conv1" }')
    with pytest.raises(caffe_model.CaffeError, match="old V1 format"):
        caffe_model.read_net(str(path))
    path.write_text('name: "empty"')
    with pytest.raises(caffe_model.CaffeError, match="holds no layers"):
        caffe_model.read_net(str(path))
    (tmp_path / "bad.caffemodel").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(caffe_model.CaffeError, match="bad.caffemodel: not a binary Caffe model"):
        caffe_model.read_blobs(str(tmp_path / "bad.caffemodel"))


def test_binary_blobs_in_the_new_and_the_legacy_shape_and_unknown_fields_skipped(tmp_path):
    weights = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    new = _field(7, _field(1, b"".join(_varint(d) for d in weights.shape))) + _field(5, weights.tobytes())
    # legacy: num 1, channels 1, height 1, width 5 as varint fields 1-4
    legacy = b"".join(_varint(i << 3) + _varint(d) for i, d in enumerate((1, 1, 1, 5), 1))
    legacy += _field(5, np.arange(5, dtype="<f4").tobytes())
    unknown = _field(106, _field(1, b"junk"))  # a convolution_param the reader skips
    layer = _field(1, b"conv") + _field(2, b"Convolution") + unknown + _field(7, new) + _field(7, legacy)
    (tmp_path / "m.caffemodel").write_bytes(_field(100, layer) + _field(100, _field(1, b"relu")))
    blobs = caffe_model.read_blobs(str(tmp_path / "m.caffemodel"))
    assert list(blobs) == ["conv"]
    np.testing.assert_array_equal(blobs["conv"][0], weights)
    np.testing.assert_array_equal(blobs["conv"][1], np.arange(5))
    short = _field(7, _field(1, _varint(4))) + _field(5, np.zeros(3, "<f4").tobytes())
    (tmp_path / "s.caffemodel").write_bytes(_field(100, _field(1, b"fc") + _field(7, short)))
    with pytest.raises(caffe_model.CaffeError, match=r"layer 'fc': a blob of shape \(4,\) holds 3 values"):
        caffe_model.read_blobs(str(tmp_path / "s.caffemodel"))
