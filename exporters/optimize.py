"""Graph optimisation with onnxruntime's transformer optimizer, plus the one fusion it misses on adapter models.

onnxruntime finds an attention block by walking up from the LayerNorm that follows it: LayerNorm <- Add <-
output dense <- context. In a Houlsby model (an adapter after attention) the adapter sits between the output
dense and that LayerNorm, so onnxruntime fuses nothing there. `AdapterAttentionFusion` anchors on the softmax
instead and reuses onnxruntime's own node builder, so every attention block becomes one fused Attention node.

Heads are read per layer from the Q Reshape in the graph (`num_heads=0, hidden_size=0`): after pruning,
layers differ and `config.num_attention_heads` is wrong. The attention mask goes in raw (a [batch, seq] 0/1
tensor), because onnxruntime's default mask-index format assumes right padding.

Residual additions are written as `Sum`, not `Add` (`residual_sums`): onnxruntime fuses Add + LayerNormalization
into SkipLayerNormalization when a session loads a graph (`SkipLayerNormFusion`, level 2, on by default), and
on the CPU that kernel is several times slower than the pair it replaces in onnxruntime 1.30 to 1.32 (5-7x on
the residual LayerNorms of a [b, 128, 384] graph; benchmarks/results/sessions.md). The fusion matches only a
LayerNormalization whose input comes from an `Add` (skip_layer_norm_fusion.cc), and a two-input `Sum` is the same
IEEE addition, so every session, ours or a plain `InferenceSession(path)`, runs the fast pair with no option.
Providers whose fused kernel is the fast one (CUDA) get the `Add` back when our session loads the graph
(`skip_layer_norm_form`, used by `exporters.runtime.make_session`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import onnx

from . import graph_io


def _optimizer_modules():
    from onnxruntime.transformers.fusion_attention import FusionAttention
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    return FusionAttention, FusionOptions, optimize_model


def adapter_attention_fusion(onnx_model):
    """A FusionAttention that starts from each Softmax left unfused, for attention blocks whose output dense
    does not feed a LayerNorm directly (adapters in between)."""
    FusionAttention, _, _ = _optimizer_modules()

    class AdapterAttentionFusion(FusionAttention):
        def fuse(self, softmax, input_name_to_nodes, output_name_to_node):
            m = self.model
            matmul_qkv = next((n for n in input_name_to_nodes.get(softmax.output[0], []) if n.op_type == "MatMul"), None)
            if matmul_qkv is None:
                return
            children = input_name_to_nodes.get(matmul_qkv.output[0], [])
            transpose_qkv = children[0] if len(children) == 1 and children[0].op_type == "Transpose" else None
            if transpose_qkv is None:
                return
            children = input_name_to_nodes.get(transpose_qkv.output[0], [])
            reshape_qkv = children[0] if len(children) == 1 and children[0].op_type == "Reshape" else None
            if reshape_qkv is None:
                return
            v_nodes = m.match_parent_path(matmul_qkv, ["Transpose", "Reshape", "Add", "MatMul"], [1, 0, 0, None])
            qk_nodes = (m.match_parent_path(matmul_qkv, ["Softmax", "Add", "Div", "MatMul"], [0, 0, None, 0])
                        or m.match_parent_path(matmul_qkv, ["Softmax", "Add", "Mul", "MatMul"], [0, 0, None, 0]))
            if v_nodes is None or qk_nodes is None:
                return
            _, add_qk, _, matmul_qk = qk_nodes
            q_nodes = m.match_parent_path(matmul_qk, ["Transpose", "Reshape", "Add", "MatMul"], [0, 0, 0, None])
            k_nodes = (m.match_parent_path(matmul_qk, ["Transpose", "Reshape", "Add", "MatMul"], [1, 0, 0, None])
                       or m.match_parent_path(matmul_qk, ["Transpose", "Transpose", "Reshape", "Add", "MatMul"],
                                              [1, 0, 0, 0, None]))
            if q_nodes is None or k_nodes is None:
                return
            _, mask_nodes, _ = m.match_parent_paths(add_qk, [
                (["Mul", "Sub", "Cast", "Unsqueeze", "Unsqueeze"], [None, 0, 1, 0, 0]),
                (["Mul", "Sub", "Unsqueeze", "Unsqueeze"], [None, 0, 1, 0]),
            ], output_name_to_node)
            if mask_nodes is None:
                return
            _, mask_value = m.get_constant_input(mask_nodes[0])
            if mask_value is None or mask_value.size != 1 or mask_value.item() >= 0:
                return
            matmul_q, matmul_k, matmul_v = q_nodes[-1], k_nodes[-1], v_nodes[-1]
            root = matmul_q.input[0]
            if matmul_k.input[0] != root or matmul_v.input[0] != root:
                return
            # hidden_size: the heads' width (num_heads x head size), which onnxruntime checks against num_heads;
            # after pruning it is narrower than the layer's input (3 heads of 8 in a 32-wide model)
            num_heads, hidden_size = self.get_num_heads_and_hidden_size(q_nodes[1])
            q_weight = m.get_initializer(matmul_q.input[1])
            if num_heads <= 0 or q_weight is None:
                return
            if mask_value.item() != -10000:
                self.mask_filter_value = mask_value.item()
            node = self.create_attention_node(
                mask_index=self.attention_mask.process_mask(mask_nodes[-1].input[0]),
                q_matmul=matmul_q, k_matmul=matmul_k, v_matmul=matmul_v,
                q_add=q_nodes[-2], k_add=k_nodes[-2], v_add=v_nodes[-2],
                num_heads=num_heads, hidden_size=hidden_size, first_input=root, output=reshape_qkv.output[0])
            if node is None:
                return
            self.nodes_to_add.append(node)
            self.node_name_to_graph_name[node.name] = self.this_graph_name
            self.nodes_to_remove.extend([reshape_qkv, transpose_qkv, matmul_qkv, *qk_nodes, *q_nodes, *k_nodes,
                                         *v_nodes])
            self.prune_graph = True  # the mask subgraph is shared: prune what no node uses any more

    return AdapterAttentionFusion(onnx_model, 0, 0, onnx_model.attention_mask, search_op_types=["Softmax"])


def optimize_graph(src: Path, dst: Path, model_type: str = "bert") -> dict:
    """onnxruntime's transformer optimizer (offline fusions only: the session adds its own at load), then the
    adapter attention fusion. Writes `dst`; weights go to external data when the model passes 2 GB. `src` may
    keep its weights in external data (`export_graph(..., external=True)`). Returns the written graph's
    `attention_in` (reading an inline graph back would load its weights)."""
    _, FusionOptions, optimize_model = _optimizer_modules()
    options = FusionOptions(model_type)
    options.use_raw_attention_mask(True)
    # Add + LayerNormalization stay unfused, and their Add becomes a Sum below (residual_sums): onnxruntime's CPU
    # SkipLayerNormalization kernel is slower than the pair, and a Sum is what its load-time fusion leaves alone
    options.enable_skip_layer_norm = False
    # onnxruntime warns that pruned layers' Q/K/V width differs from the input width: expected, not a fault
    logging.getLogger("fusion_attention").setLevel(logging.ERROR)
    # Memory: the graph is read without its external data and a weight is read only when a fusion asks for its
    # values (Q, K and V, which attention fusion concatenates, and small constants), so the shape-inference copies
    # the optimizer makes hold no weights; the result is written one tensor at a time (exporters/graph_io.py)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    with graph_io.lazy_external_data(src.parent):
        model = optimize_model(onnx.load(str(src), load_external_data=False), model_type=model_type, num_heads=0,
                               hidden_size=0, optimization_options=options, opt_level=0)
        adapter_attention_fusion(model).apply()
        residual_sums(model.model)
        model.topological_sort()
    # what OnnxModel.save adds before writing: the com.microsoft opset when a fused node needs it
    onnx_model = model.model
    if any(n.domain == "com.microsoft" for n in onnx_model.graph.node) and not any(
            o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.add(domain="com.microsoft", version=1)
    graph_io.write_model(onnx_model, dst, base_dir=src.parent)
    return attention_in(onnx_model.graph)


def _residual_adds(graph, op_type: str) -> list:
    """The two-input `op_type` nodes whose output is the input of a LayerNormalization."""
    ln_inputs = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")}
    return [n for n in graph.node if n.op_type == op_type and n.domain in ("", "ai.onnx") and len(n.input) == 2
            and n.output[0] in ln_inputs]


def residual_sums(model: onnx.ModelProto) -> int:
    """Rewrite every Add that feeds a LayerNormalization as a two-input Sum (same broadcasting, same IEEE
    addition: the outputs are bit for bit the same), which onnxruntime's load-time SkipLayerNormFusion does not
    match, so no session turns the pair into the slow CPU SkipLayerNormalization kernel. Returns the count."""
    nodes = _residual_adds(model.graph, "Add")
    for node in nodes:
        node.op_type = "Sum"
    return len(nodes)


def skip_layer_norm_form(model: onnx.ModelProto) -> int:
    """The inverse of `residual_sums`, for providers whose fused SkipLayerNormalization is the fast kernel (CUDA):
    every two-input Sum that feeds a LayerNormalization becomes an Add again, which onnxruntime fuses with the
    LayerNormalization when it loads the graph. Returns the count."""
    nodes = _residual_adds(model.graph, "Sum")
    for node in nodes:
        node.op_type = "Add"
    return len(nodes)


_LAYER = re.compile(r"layer\.(\d+)/")


def attention_nodes_per_layer(path: Path) -> dict:
    """{layer index: [num_heads of each fused Attention node]}, the layer read from the scope name of the node
    that consumes the attention output (the output dense MatMul keeps its exporter name)."""
    return attention_in(onnx.load(str(path), load_external_data=False).graph)


def attention_in(graph: onnx.GraphProto) -> dict:
    """`attention_nodes_per_layer` of a graph in memory."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for node in graph.node:
        if node.op_type not in ("Attention", "MultiHeadAttention"):
            continue
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        names = [c.name for c in consumers.get(node.output[0], [])] + [node.name]
        match = next((_LAYER.search(n) for n in names if _LAYER.search(n)), None)
        found.setdefault(int(match.group(1)) if match else -1, []).append(heads)
    return found


def op_counts(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
