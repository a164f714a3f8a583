#!/usr/bin/python3
"""gen_seeds.py: the seed models of tests/fuzz/fuzz_onnx.c, written with python3-onnx's helper
API (Debian python3-onnx). Small graphs covering the loader's paths: convolutions with pads,
groups and fused activations, batch norm folding with float16 weights, instance norm, pools,
transposed convolution, concat, softmax, argmax, Resize (scales and sizes) and Upsample, the
Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain, Constant nodes, raw and typed tensor
data. Run it from this folder to rewrite the .onnx seeds (they are committed):
    /usr/bin/python3 gen_seeds.py
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(7)


def w(name, *shape, dtype=np.float32):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def save(name, nodes, inputs, outputs, inits, opset=13):
    g = helper.make_graph(nodes, name, inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 7
    onnx.save(m, name + ".onnx")


def tin(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


save("conv_relu",
     [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 0, 1, 2], strides=[1, 2], group=2),
      helper.make_node("Relu", ["c"], ["y"])],
     [tin("x", [1, 4, 6, 7])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w("w", 4, 2, 3, 3), w("b", 4)])

save("bn_fp16",
     [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
      helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], epsilon=1e-3),
      helper.make_node("LeakyRelu", ["n"], ["y"], alpha=0.1)],
     [tin("x", ["N", 1, 5, 5])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
     [w("w", 3, 1, 3, 3, dtype=np.float16), w("g", 3), w("be", 3), w("m", 3),
      numpy_helper.from_array(np.abs(rng.standard_normal(3)).astype(np.float32) + 0.5, "v")])

save("unet_block3d",
     [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 6),
      helper.make_node("InstanceNormalization", ["c1", "s1", "t1"], ["n1"]),
      helper.make_node("LeakyRelu", ["n1"], ["a1"], alpha=0.01),
      helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
      helper.make_node("ConvTranspose", ["p1", "wt"], ["u1"], kernel_shape=[2, 2, 2], strides=[2, 2, 2]),
      helper.make_node("Concat", ["a1", "u1"], ["cat"], axis=1),
      helper.make_node("Conv", ["cat", "w2"], ["logits"]),
      helper.make_node("Softmax", ["logits"], ["y"], axis=1)],
     [tin("x", [1, 1, 4, 6, 6])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
     [w("w1", 2, 1, 3, 3, 3), w("b1", 2), w("s1", 2), w("t1", 2), w("wt", 2, 2, 2, 2, 2),
      w("w2", 3, 4, 1, 1, 1)])

save("shape_chain",
     [helper.make_node("Shape", ["x"], ["s"]),
      helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
      helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
      helper.make_node("Constant", [], ["m1"], value=helper.make_tensor("m1", TensorProto.INT64, [1], [-1])),
      helper.make_node("Concat", ["n1", "m1"], ["shp"], axis=0),
      helper.make_node("Reshape", ["x", "shp"], ["f"]),
      helper.make_node("Flatten", ["f"], ["y"], axis=1)],
     [tin("x", [1, 2, 3, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
     [numpy_helper.from_array(np.array(0, np.int64), "i0"),
      numpy_helper.from_array(np.array([0], np.int64), "ax")])

save("resize_avgpool",
     [helper.make_node("Resize", ["x", "", "sc"], ["r"], mode="linear"),
      helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                       count_include_pad=1, ceil_mode=1, strides=[2, 2]),
      helper.make_node("Resize", ["p", "", "", "sz"], ["q"], mode="nearest",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
      helper.make_node("Sigmoid", ["q"], ["g"]),
      helper.make_node("Mul", ["g", "q"], ["y"])],
     [tin("x", [1, 2, 5, 6])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
     [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
      numpy_helper.from_array(np.array([1, 2, 7, 9], np.int64), "sz")])

save("upsample9_argmax",
     [helper.make_node("Upsample", ["x", "sc"], ["u"], mode="nearest"),
      helper.make_node("PRelu", ["u", "sl"], ["p"]),
      helper.make_node("ArgMax", ["p"], ["y"], axis=1, keepdims=1)],
     [tin("x", [1, 3, 4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
     [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"), w("sl", 3, 1, 1)],
     opset=9)
