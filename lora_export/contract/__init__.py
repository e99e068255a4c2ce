"""The LoRA tensor name contract, in one place.

Every module that builds, recognises or checks a LoRA tensor name, a slot or the graph manifest goes
through here; nothing else spells `.lora_A.weight` or `adapter_index` (a test greps for it). The package sits
at the bottom of lora_export: it imports only the standard library, numpy and `lora_export.errors`.

Names (for each adapted module at path `P`, as the transformers model names it, no `base_model.model.`):

- `inputs` layout: graph inputs `P.lora_A.weight` `[in, r_k]` and `P.lora_B.weight` `[r_k, out]`, the
  scaling folded into B, each with a same-name rank-0 default initializer (a run without adapter = base);
  `r_k` is one symbolic rank dimension per module.
- `bank` layout: `adapter_index` `[batch]` (int64, `NO_ADAPTER` = -1 = no adapter) and per module
  `P.lora_A.bank` `[num_adapters, in, R]`, `P.lora_B.bank` `[num_adapters, R, out]`.
- embedding modules (LoRA on `nn.Embedding`, PEFT's `lora_embedding_A/B`) use the same two names: A
  `[num_embeddings, r]` is indexed by token id (a gather of A's rows), then multiplied by B `[r, dim]`.
- DoRA (`dora_names(P)`): `P.dora_scale.weight` `[out]` holds `g = m / ||W0 + s·B·A||` (one factor per output
  channel, computed from the adapter and the graph's base weight when it is fed); the branch computes
  `g * (W0·x + s·B·A·x) + bias`. Default ones (= plain LoRA). Bank layout: `P.dora_scale.bank` `[num_adapters,
  out]`. Graphs have these inputs only when exported for DoRA.
- `modules_to_save` (`saved_name(M, p)`): a module the adapter replaces whole (a classification head) takes its
  parameters from inputs `M.modules_to_save.p` (`p` = the parameter's path inside M, e.g. `dense.weight`),
  whose same-name defaults are the base model's values. Bank layout: `M.modules_to_save.p.bank`
  `[num_adapters, *shape]`, the base values kept as the initializer `M.p` for rows without an adapter.
- adapter files (`.onnx_adapter`, `.safetensors`, `.npz`) hold the `inputs`-layout tensors, with or
  without a leading `base_model.model.` on the names.
- graphs with DoRA or embedding slots record per-slot facts the inputs cannot show (layer kind, the base
  weight's initializer name and layout, which DoRA's norm needs) as JSON in the model metadata entry
  `SLOTS_METADATA`.

Decoder folders also follow Optimum / ONNX Runtime GenAI I/O names, kept here for the same reason:
`input_ids`, `attention_mask` (past + new), `position_ids`, `past_key_values.{i}.key|value` in, `logits`,
`present.{i}.key|value` out; manifest kinds `decoder-merged|decoder-inputs|decoder-bank`.

The package: `names` (tensor names), `decoder_io` (decoder folder I/O), `dtypes`, `slots` (slots and feeds),
`manifest` (the graph manifest schema). Import from the package: `from lora_export.contract import ...`.
"""

from lora_export.contract.decoder_io import (  # noqa: F401
    ATTENTION_MASK,
    BATCH_DIM,
    DECODER_KIND_PREFIX,
    DECODER_LAYOUTS,
    INPUT_IDS,
    LOGITS,
    PAST_KEY_TEMPLATE,
    PAST_SEQUENCE_DIM,
    PAST_VALUE_TEMPLATE,
    POSITION_IDS,
    PRESENT_KEY_TEMPLATE,
    PRESENT_VALUE_TEMPLATE,
    SEQUENCE_DIM,
    TOTAL_SEQUENCE_DIM,
    decoder_input_names,
    decoder_kind,
    decoder_layout,
    decoder_output_names,
    past_names,
    present_names,
)
from lora_export.contract.dtypes import (  # noqa: F401
    DTYPES,
    dtype_name,
    numpy_dtype,
    precision,
    torch_dtype,
)
from lora_export.contract.manifest import (  # noqa: F401
    MANIFEST_FORMAT,
    GraphManifest,
)
from lora_export.contract.names import (  # noqa: F401
    ADAPTER_INDEX,
    BANK,
    BANK_FORMULATIONS,
    BANK_KIND,
    CONV1D,
    DENSE,
    DORA_SCALE,
    EMBEDDING,
    GATHER,
    IN_OUT,
    INPUTS,
    LAYOUTS,
    LINEAR,
    MERGED,
    NO_ADAPTER,
    NUM_ADAPTERS_DIM,
    OUT_IN,
    PEFT_KEY_HINT,
    PEFT_PREFIX,
    SAVED,
    SLOTS_METADATA,
    WEIGHT,
    A,
    B,
    LoraName,
    bank_names,
    dora_name,
    is_adapter_tensor,
    is_lora_input,
    is_lora_tensor,
    is_rank_dim,
    layout_names,
    parse,
    parse_dora,
    parse_peft_base_layer_key,
    parse_peft_embedding_key,
    parse_peft_key,
    parse_peft_magnitude_key,
    parse_saved,
    peft_embedding_names,
    peft_magnitude_name,
    peft_names,
    rank_dim,
    saved_name,
    split_io,
    strip_peft_prefix,
    tensor_name,
    weight_names,
)
from lora_export.contract.slots import (  # noqa: F401
    AdapterLike,
    BaseWeights,
    ModuleShape,
    SavedParam,
    Slot,
    SlotTable,
    check_bank_index,
)
