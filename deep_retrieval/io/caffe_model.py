"""Caffe networks read without Caffe: a ``.prototxt`` (protobuf text
format) for the structure and a ``.caffemodel`` (binary protobuf) for the
weights.

The message schema is the part of Caffe's ``caffe.proto`` (BVLC, with Fast
R-CNN's ``roi_pooling_param = 8266711``) that inference networks use,
written here with Caffe's field numbers and defaults and parsed with
``protobuf``. Parsing only reads data: nothing in a file is executed (a
``Python`` layer is recognised by its module and class names, never run).

`read_net` refuses a text field outside the schema with the file and line;
`describe` gives each layer's effective settings (defaults applied) and
refuses settings it does not understand, naming the layer; `read_blobs`
gives each layer's weights as numpy arrays.
"""

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import DecodeError

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
            "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32, "int64": _F.TYPE_INT64}

# message: (nested enums {name: [values]}, fields [(name, number, type, repeated, default)])
_ENGINE = ["DEFAULT", "CAFFE", "CUDNN"]
_FILLER = [("type", 1, "string", False, "constant"), ("value", 2, "float", False, "0"),
           ("min", 3, "float", False, "0"), ("max", 4, "float", False, "1"), ("mean", 5, "float", False, "0"),
           ("std", 6, "float", False, "1"), ("sparse", 7, "int32", False, "-1"),
           ("variance_norm", 8, ".caffe.FillerParameter.VarianceNorm", False, None)]
_SCHEMA = {
    "BlobShape": ({}, [("dim", 1, "int64", True, None)]),
    "BlobProto": ({}, [("shape", 7, "BlobShape", False, None), ("data", 5, "float", True, None),
                       ("diff", 6, "float", True, None), ("double_data", 8, "double", True, None),
                       ("double_diff", 9, "double", True, None), ("num", 1, "int32", False, None),
                       ("channels", 2, "int32", False, None), ("height", 3, "int32", False, None),
                       ("width", 4, "int32", False, None)]),
    "FillerParameter": ({"VarianceNorm": ["FAN_IN", "FAN_OUT", "AVERAGE"]}, _FILLER),
    "ParamSpec": ({"DimCheckMode": ["STRICT", "PERMISSIVE"]},
                  [("name", 1, "string", False, None), ("share_mode", 2, ".caffe.ParamSpec.DimCheckMode", False, None),
                   ("lr_mult", 3, "float", False, "1"), ("decay_mult", 4, "float", False, "1")]),
    "NetStateRule": ({}, [("phase", 1, ".caffe.Phase", False, None), ("min_level", 2, "int32", False, None),
                          ("max_level", 3, "int32", False, None), ("stage", 4, "string", True, None),
                          ("not_stage", 5, "string", True, None)]),
    "ConvolutionParameter": ({"Engine": _ENGINE}, [
        ("num_output", 1, "uint32", False, None), ("bias_term", 2, "bool", False, "true"),
        ("pad", 3, "uint32", True, None), ("kernel_size", 4, "uint32", True, None),
        ("group", 5, "uint32", False, "1"), ("stride", 6, "uint32", True, None),
        ("weight_filler", 7, "FillerParameter", False, None), ("bias_filler", 8, "FillerParameter", False, None),
        ("pad_h", 9, "uint32", False, "0"), ("pad_w", 10, "uint32", False, "0"),
        ("kernel_h", 11, "uint32", False, None), ("kernel_w", 12, "uint32", False, None),
        ("stride_h", 13, "uint32", False, None), ("stride_w", 14, "uint32", False, None),
        ("engine", 15, ".caffe.ConvolutionParameter.Engine", False, None), ("axis", 16, "int32", False, "1"),
        ("force_nd_im2col", 17, "bool", False, "false"), ("dilation", 18, "uint32", True, None)]),
    "BatchNormParameter": ({}, [("use_global_stats", 1, "bool", False, None),
                                ("moving_average_fraction", 2, "float", False, "0.999"),
                                ("eps", 3, "float", False, "1e-05")]),
    "ScaleParameter": ({}, [("axis", 1, "int32", False, "1"), ("num_axes", 2, "int32", False, "1"),
                            ("filler", 3, "FillerParameter", False, None), ("bias_term", 4, "bool", False, "false"),
                            ("bias_filler", 5, "FillerParameter", False, None)]),
    "PoolingParameter": ({"PoolMethod": ["MAX", "AVE", "STOCHASTIC"], "Engine": _ENGINE,
                          "RoundMode": ["CEIL", "FLOOR"]}, [
        ("pool", 1, ".caffe.PoolingParameter.PoolMethod", False, None), ("pad", 4, "uint32", False, "0"),
        ("pad_h", 9, "uint32", False, "0"), ("pad_w", 10, "uint32", False, "0"),
        ("kernel_size", 2, "uint32", False, None), ("kernel_h", 5, "uint32", False, None),
        ("kernel_w", 6, "uint32", False, None), ("stride", 3, "uint32", False, "1"),
        ("stride_h", 7, "uint32", False, None), ("stride_w", 8, "uint32", False, None),
        ("engine", 11, ".caffe.PoolingParameter.Engine", False, None),
        ("global_pooling", 12, "bool", False, "false"),
        ("round_mode", 13, ".caffe.PoolingParameter.RoundMode", False, None)]),
    "EltwiseParameter": ({"EltwiseOp": ["PROD", "SUM", "MAX"]}, [
        ("operation", 1, ".caffe.EltwiseParameter.EltwiseOp", False, "SUM"), ("coeff", 2, "float", True, None),
        ("stable_prod_grad", 3, "bool", False, "true")]),
    "ReLUParameter": ({"Engine": _ENGINE}, [("negative_slope", 1, "float", False, "0"),
                                            ("engine", 2, ".caffe.ReLUParameter.Engine", False, None)]),
    "InnerProductParameter": ({}, [
        ("num_output", 1, "uint32", False, None), ("bias_term", 2, "bool", False, "true"),
        ("weight_filler", 3, "FillerParameter", False, None), ("bias_filler", 4, "FillerParameter", False, None),
        ("axis", 5, "int32", False, "1"), ("transpose", 6, "bool", False, "false")]),
    "ReshapeParameter": ({}, [("shape", 1, "BlobShape", False, None), ("axis", 2, "int32", False, "0"),
                              ("num_axes", 3, "int32", False, "-1")]),
    "PythonParameter": ({}, [("module", 1, "string", False, None), ("layer", 2, "string", False, None),
                             ("param_str", 3, "string", False, ""),
                             ("share_in_parallel", 4, "bool", False, "false")]),
    "ROIPoolingParameter": ({}, [("pooled_h", 1, "uint32", False, "0"), ("pooled_w", 2, "uint32", False, "0"),
                                 ("spatial_scale", 3, "float", False, "1")]),
    "LayerParameter": ({}, [
        ("name", 1, "string", False, None), ("type", 2, "string", False, None),
        ("bottom", 3, "string", True, None), ("top", 4, "string", True, None),
        ("phase", 10, ".caffe.Phase", False, None), ("loss_weight", 5, "float", True, None),
        ("param", 6, "ParamSpec", True, None), ("blobs", 7, "BlobProto", True, None),
        ("propagate_down", 11, "bool", True, None), ("include", 8, "NetStateRule", True, None),
        ("exclude", 9, "NetStateRule", True, None),
        ("batch_norm_param", 139, "BatchNormParameter", False, None),
        ("convolution_param", 106, "ConvolutionParameter", False, None),
        ("eltwise_param", 110, "EltwiseParameter", False, None),
        ("inner_product_param", 117, "InnerProductParameter", False, None),
        ("pooling_param", 121, "PoolingParameter", False, None),
        ("python_param", 130, "PythonParameter", False, None),
        ("relu_param", 123, "ReLUParameter", False, None),
        ("reshape_param", 133, "ReshapeParameter", False, None),
        ("scale_param", 142, "ScaleParameter", False, None),
        ("roi_pooling_param", 8266711, "ROIPoolingParameter", False, None)]),
    # Caffe's pre-2015 format (``layers``): recognised only to be refused.
    "V1LayerParameter": ({}, [("name", 4, "string", False, None)]),
    "NetParameter": ({}, [
        ("name", 1, "string", False, None), ("input", 3, "string", True, None),
        ("input_shape", 8, "BlobShape", True, None), ("input_dim", 4, "int32", True, None),
        ("layer", 100, "LayerParameter", True, None), ("layers", 2, "V1LayerParameter", True, None)]),
}


def _messages():
    proto = descriptor_pb2.FileDescriptorProto(name="deep_retrieval_caffe.proto", package="caffe", syntax="proto2")
    phase = proto.enum_type.add(name="Phase")
    for number, value in enumerate(("TRAIN", "TEST")):
        phase.value.add(name=value, number=number)
    for name, (enums, fields) in _SCHEMA.items():
        message = proto.message_type.add(name=name)
        for enum_name, values in enums.items():
            enum = message.enum_type.add(name=enum_name)
            for number, value in enumerate(values):
                enum.value.add(name=value, number=number)
        for field, number, kind, repeated, default in fields:
            f = message.field.add(name=field, number=number,
                                  label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if kind in _SCALARS:
                f.type = _SCALARS[kind]
            elif kind.startswith("."):
                f.type, f.type_name = _F.TYPE_ENUM, kind
            else:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".caffe.{kind}"
            if default is not None:
                f.default_value = default
            if repeated and kind in ("float", "double", "int64"):
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
            for name in ("NetParameter", "LayerParameter", "BlobProto")}


_CLASSES = _messages()
NetParameter = _CLASSES["NetParameter"]
"""The network message class (for writers and tests)."""


class CaffeError(ValueError):
    """A Caffe file this reader does not understand (the message names the
    file and the layer)."""


def read_net(path):
    """The ``NetParameter`` of a ``.prototxt`` file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CaffeError(f"{path}: cannot read the prototxt ({e})") from None
    net = NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as e:
        raise CaffeError(f"{path}:{e} (not understood by this reader)") from None
    _check_format(path, net)
    return net


def read_weights(path):
    """The ``NetParameter`` of a ``.caffemodel`` file (fields outside the
    schema, such as a layer's parameters, are skipped: only names, types
    and blobs are read from it)."""
    net = NetParameter()
    try:
        with open(path, "rb") as f:
            net.ParseFromString(f.read())
    except OSError as e:
        raise CaffeError(f"{path}: cannot read the caffemodel ({e})") from None
    except DecodeError as e:
        raise CaffeError(f"{path}: not a binary Caffe model ({e})") from None
    _check_format(path, net)
    return net


def _check_format(path, net):
    if len(net.layers):
        raise CaffeError(f"{path}: written in Caffe's old V1 format ('layers'); upgrade it with Caffe's "
                         "upgrade_net_proto_text / upgrade_net_proto_binary first")
    if not len(net.layer):
        raise CaffeError(f"{path}: holds no layers")


def blob_array(blob):
    """A ``BlobProto`` as a float32 numpy array of its shape (``shape.dim``,
    or the legacy ``num, channels, height, width``)."""
    values = blob.double_data if len(blob.double_data) else blob.data
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))
        while len(shape) > 1 and shape[0] <= 1 and int(np.prod(shape)) == len(values):
            shape = shape[1:]  # legacy 4-D blobs pad leading dims with 1 (or 0)
    array = np.asarray(values, np.float32)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"a blob of shape {shape} holds {array.size} values")
    return array.reshape(shape)


def read_blobs(path):
    """``{layer name: [arrays]}`` of a ``.caffemodel``, for layers with blobs."""
    out = {}
    for layer in read_weights(path).layer:
        if len(layer.blobs):
            try:
                out[layer.name] = [blob_array(b) for b in layer.blobs]
            except ValueError as e:
                raise CaffeError(f"{path}: layer {layer.name!r}: {e}") from None
    return out


def _refuse(layer, reason):
    raise CaffeError(f"layer {layer.name!r} ({layer.type}): {reason}")


def _square(layer, value, h, w, what):
    """A square kernel, stride or pad from Caffe's repeated/``_h``/``_w`` forms."""
    if h is not None or w is not None:
        if h != w:
            _refuse(layer, f"{what} {h}x{w} is not square")
        return h
    values = set(value)
    if len(values) > 1:
        _refuse(layer, f"{what} {list(value)} is not square")
    return values.pop() if values else None


def _get(message, field):
    return getattr(message, field) if message.HasField(field) else None


def describe(layer):
    """A layer's effective settings as a plain dict (``name``, ``type``,
    ``bottom``, ``top`` and its type's settings with Caffe's defaults
    applied). Raises `CaffeError` naming the layer for a type or setting
    this reader does not understand."""
    out = {"name": layer.name, "type": layer.type, "bottom": tuple(layer.bottom), "top": tuple(layer.top)}
    if len(layer.include) or len(layer.exclude):
        _refuse(layer, "phase rules (include / exclude) are not supported in a deploy network")
    kind = layer.type
    if kind == "Convolution":
        p = layer.convolution_param
        if p.group != 1 or any(d != 1 for d in p.dilation) or p.axis != 1:
            _refuse(layer, f"group {p.group}, dilation {list(p.dilation)}, axis {p.axis} (only 1 is supported)")
        kernel = _square(layer, p.kernel_size, _get(p, "kernel_h"), _get(p, "kernel_w"), "kernel")
        stride = _square(layer, p.stride, _get(p, "stride_h"), _get(p, "stride_w"), "stride")
        pad = _square(layer, p.pad, _get(p, "pad_h"), _get(p, "pad_w"), "pad")
        out.update(num_output=p.num_output, kernel=kernel, stride=stride or 1, pad=pad or 0, bias=p.bias_term)
    elif kind == "BatchNorm":
        p = layer.batch_norm_param
        if p.HasField("use_global_stats") and not p.use_global_stats:
            _refuse(layer, "use_global_stats: false normalises with each batch's statistics, not the stored ones")
        out.update(eps=float(f"{p.eps:.6g}"))  # float32 to the digits written
    elif kind == "Scale":
        p = layer.scale_param
        if len(layer.bottom) != 1 or p.axis != 1 or p.num_axes != 1:
            _refuse(layer, "only a learned per-channel scale (one bottom, axis 1, num_axes 1) is supported")
        out.update(bias=p.bias_term)
    elif kind == "ReLU":
        if layer.relu_param.negative_slope != 0:
            _refuse(layer, f"negative_slope {layer.relu_param.negative_slope} (leaky ReLU) is not supported")
    elif kind == "Pooling":
        p = layer.pooling_param
        if p.global_pooling:
            _refuse(layer, "global_pooling is not supported")
        out.update(pool=type(p).PoolMethod.Name(p.pool),
                   kernel=_square(layer, [p.kernel_size] if p.HasField("kernel_size") else [],
                                  _get(p, "kernel_h"), _get(p, "kernel_w"), "kernel"),
                   stride=_square(layer, [p.stride], _get(p, "stride_h"), _get(p, "stride_w"), "stride"),
                   pad=_square(layer, [p.pad], _get(p, "pad_h"), _get(p, "pad_w"), "pad"),
                   round_mode=type(p).RoundMode.Name(p.round_mode))
    elif kind == "Eltwise":
        p = layer.eltwise_param
        if any(c != 1 for c in p.coeff):
            _refuse(layer, f"coefficients {list(p.coeff)} are not supported")
        out.update(operation=type(p).EltwiseOp.Name(p.operation))
    elif kind == "InnerProduct":
        p = layer.inner_product_param
        if p.axis != 1 or p.transpose:
            _refuse(layer, f"axis {p.axis}, transpose {p.transpose} (only axis 1, not transposed)")
        out.update(num_output=p.num_output, bias=p.bias_term)
    elif kind == "ROIPooling":
        p = layer.roi_pooling_param
        out.update(pooled=(p.pooled_h, p.pooled_w), spatial_scale=float(p.spatial_scale))
    elif kind == "Reshape":
        p = layer.reshape_param
        out.update(shape=tuple(int(d) for d in p.shape.dim), axis=p.axis, num_axes=p.num_axes)
    elif kind == "Normalize":
        pass
    elif kind == "Python":
        p = layer.python_param
        known = {"NormalizeLayer": "Normalize", "AggregateLayer": "Aggregate"}
        if p.layer not in known:
            _refuse(layer, f"Python layer {p.module}.{p.layer} is not understood (known: {', '.join(known)}; "
                           "it is never run)")
        out.update(type=known[p.layer], python=f"{p.module}.{p.layer}")
    else:
        _refuse(layer, "this layer type is not understood")
    return out
