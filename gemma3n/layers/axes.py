"""Logical axis names of the decoder's weights: the vocabulary that sharding rules, LoRA targets
and quantization speak.

Every weight is declared with one name per dimension (`gemma3n.layers.weights.declare`); a
sharding rule maps a name to mesh axes, so the same weight shards the same way wherever it is
used. Names describe what a dimension indexes, not where it sits in an einsum string.
"""

VOCAB = 'vocab'                # rows of the embedding / tied output head, the per-layer table
EMBED = 'embed'                # the model width D
Q_HEADS = 'q_heads'            # query heads N
KV_HEADS = 'kv_heads'          # key/value heads K
HEAD_DIM = 'head_dim'          # H, per head
KV = 'kv'                      # the stacked key and value projections (2)
GATE = 'gate'                  # the stacked gate and up projections of the FFN (2)
MLP = 'mlp'                    # the FFN hidden width F
LAYERS = 'layers'              # decoder layers, where one weight holds all of them
PER_LAYER = 'per_layer'        # per-layer input width P
ALTUP = 'altup'                # AltUp streams
MODALITIES = 'modalities'      # AltUp router outputs
LAUREL = 'laurel'              # the LAuReL low rank
VISION_EMBED = 'vision_embed'  # the vision encoder's output width
# A D -> D projection's output (AltUp's stream projections): a name of its own, since a sharding
# rule cannot map two axes of one weight to the same mesh axis.
EMBED_PROJECTED = 'embed_projected'
ALTUP_SOURCE = 'altup_source'  # the stream an AltUp prediction coefficient reads
BATCH = 'batch'                # rows of a batch of sequences (activations and the KV cache)
