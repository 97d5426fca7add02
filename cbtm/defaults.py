"""Named defaults, one place for every stage (the CLI's defaults are these too)."""

TEMPERATURE = 0.1          # router T of softmax(-d^2 / T), the paper's default
ROUTINGS = ("auto", "prefix", "distance")  # the router weights one can ask for (cli choices, Router.load)
ROUTING = "auto"           # router weights: "prefix" (the run's prefix classifier), "distance", or
                           # "auto" = prefix when the run has one
PREFIX_DOCUMENTS = 20_000  # training documents sampled to fit a prefix router ...
PREFIX_CUTS = 16           # ... and prefixes (log-uniform lengths) taken of each
TOP_K = 2                  # experts kept per context by an ensemble
TOP_KS = ("1", "2", "4", "all")  # top-k values evaluated
VALID_FRACTION = 0.05      # documents hashed into the validation split
SPLIT_SEED = 0             # seed of the validation split and of the clustering
SAMPLE = 200_000           # documents sampled to fit the router
N_COMPONENTS = 100         # SVD dimensions of the embedder
MAX_ITER = 20              # k-means iterations
MAX_SIZE_RATIO = 1.5       # a cluster holds at most this x N / K documents (1.0: exactly balanced, the paper's):
                           # clusters follow domains of unequal size instead of splitting them to fill quotas
VOCAB_SIZE = 8192          # byte-level BPE trained when a run has no tokenizer
MODEL_SIZE = "tiny"        # named model config of fresh experts
EVAL_BATCH = 32            # texts scored at once by an ensemble
EVAL_CHUNK_TOKENS = 8192   # padded positions per expert forward pass when scoring
BASELINES = ("random", "unbalanced", "gold")  # the demo's baselines: random equal / unbalanced k-means / gold labels
MAX_DOCUMENT_BYTES = 64 << 20  # longest line (document) a corpus reader takes: a longer one is an error naming
                               # file and line, read in bounded memory
