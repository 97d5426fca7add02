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
EVAL_PACKED_TOKENS = 32768  # positions per stacked forward when scoring (packed: no padding); fewer forwards,
                            # fewer passes over every routed expert's weights
BASELINES = ("random", "unbalanced", "gold")  # the demo's baselines: random equal / unbalanced k-means / gold labels
MAX_BATCH = 64             # sequences decoded together by the generation engine (more wait their turn)
MAX_NEW_TOKENS = 1 << 20   # largest max_new_tokens accepted (generation slides its window past the context)
MAX_LOGPROBS = 20          # most alternatives per token a decoder reports (OpenAI's completions limit)
SERVE_HOST = "127.0.0.1"   # `cbtm serve` binds the loopback interface unless told otherwise
SERVE_PORT = 8000          # ... on this port
SERVE_MAX_QUEUE = 256      # sequences a server holds waiting for a batch slot (more: 429 with Retry-After)
SERVE_MAX_PROMPT_TOKENS = 8192   # longest prompt a server accepts (tokens; longer: 400 naming `prompt`)
SERVE_MAX_TOKENS = 4096    # largest `max_tokens` a server accepts per completion
SERVE_DEFAULT_MAX_TOKENS = 16    # `max_tokens` when a request leaves it out (OpenAI's default)
SERVE_MAX_BODY = 1 << 20   # largest request body in bytes (larger: 413)
SERVE_GRACE = 30.0         # seconds in-flight requests get to finish after SIGTERM
SERVE_ENGINE_START = 600.0   # seconds `cbtm serve`'s engine process may take to load a run
SERVE_TOP_TERMS = 8        # tf-idf terms shown per cluster on the server's page
SAVE_DTYPES = ("auto", "float32", "float16", "bfloat16")  # dtypes a trained or merged model can be saved in
SAVE_DTYPE = "auto"        # "auto": the dtype the model's weights came in (a seed checkpoint's, or float32 when fresh)
MAX_DOCUMENT_BYTES = 64 << 20  # longest line (document) a corpus reader takes: a longer one is an error naming
                               # file and line, read in bounded memory
