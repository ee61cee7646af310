/* kiln runtime C API: chat sessions on a compiled kiln model library.
 *
 * Link order: your objects, the model's libkiln_model.a, then libruntime.a, then
 * -lpthread -ldl -lm. Every function reports failure by its return value; the message of
 * the last failure on the calling thread is kiln_last_error().
 */
#ifndef KILN_H
#define KILN_H

#include <stddef.h> /* size_t */

#ifndef KILN_ABI_H
#define KILN_ABI_H
#include <stdint.h>

#define KILN_ABI_VERSION 4
#define KILN_MAX_IO 8
#define KILN_FINGERPRINT_BYTES 32
#define KILN_DTYPE_I32 0
#define KILN_DTYPE_F32 1

struct kiln_ctx;
/* A kernel task: runs its share `ith` of `nth` of one kernel. */
typedef void (*kiln_task_fn)(const struct kiln_ctx *ctx, int64_t ith, int64_t nth);
/* Runs task(ctx, ith, nth) for every ith in 0..nth on a thread pool and waits. */
typedef void (*kiln_parallel_for_fn)(void *pool, kiln_task_fn task, const struct kiln_ctx *ctx);

/* The argument of a model's run function, filled in by the runtime. */
struct kiln_ctx {
    uint8_t *arena;            /* activation arena, desc->arena_bytes, 64-byte aligned */
    const uint8_t *weights;    /* packed weights, desc->weights_bytes */
    void *kv_cache;            /* desc->kv_bytes, zeroed at start */
    void *const *io;           /* inputs then outputs, rows of desc->io_width values */
    int64_t n_tokens;          /* 1..=desc->batch */
    int64_t pos;               /* position of the first token; pos + n_tokens <= context */
    int64_t out_start;         /* outputs are computed for rows out_start..n_tokens only, and each
                                  output buffer holds just those n_tokens - out_start rows */
    kiln_parallel_for_fn parallel_for;
    void *pool;
};

/* What a compiled model library exports (as `kiln_model`). */
struct kiln_model_desc {
    uint32_t abi_version;
    uint32_t n_inputs;
    uint32_t n_outputs;
    uint32_t batch;            /* most tokens per run call */
    uint32_t context;          /* KV cache positions */
    uint32_t kv_layers;
    uint32_t kv_width;         /* elements per position per layer, for keys and for values */
    uint32_t kv_element_bytes; /* 4 (f32) or 2 (f16, IEEE half) */
    uint64_t arena_bytes;
    uint64_t kv_bytes;
    uint64_t weights_bytes;
    uint64_t weights_checksum; /* of the packed weights: 8-lane FNV-1a 64 (see the runtime) */
    const uint8_t *weights;    /* embedded weights, or NULL when they ship as weights.bin */
    void (*run)(const struct kiln_ctx *ctx);
    uint32_t io_dtype[KILN_MAX_IO];
    uint32_t io_width[KILN_MAX_IO];
    /* SHA-256 of the build's inputs and options, also in the bundle's manifest.json */
    uint8_t fingerprint[KILN_FINGERPRINT_BYTES];
    uint32_t cpu_features;     /* KILN_CPU_* bits the code needs; checked before it runs */
    uint32_t reserved;
};

/* CPU features (kiln_model_desc.cpu_features). x86-64: */
#define KILN_CPU_SSE3 (1u << 0)
#define KILN_CPU_SSSE3 (1u << 1)
#define KILN_CPU_SSE41 (1u << 2)
#define KILN_CPU_SSE42 (1u << 3)
#define KILN_CPU_POPCNT (1u << 4)
#define KILN_CPU_AVX (1u << 5)
#define KILN_CPU_AVX2 (1u << 6)
#define KILN_CPU_FMA (1u << 7)
#define KILN_CPU_BMI1 (1u << 8)
#define KILN_CPU_BMI2 (1u << 9)
#define KILN_CPU_LZCNT (1u << 10)
#define KILN_CPU_F16C (1u << 11)
/* AArch64 (beyond the baseline's NEON): */
#define KILN_CPU_DOTPROD (1u << 16)
#define KILN_CPU_FP16 (1u << 17)
#define KILN_CPU_I8MM (1u << 18)

#endif /* KILN_ABI_H */

#ifdef __cplusplus
extern "C" {
#endif

/* Threads and callbacks:
 * - A session serves one call at a time: use it from one thread at a time. Different
 *   sessions may be used on different threads at once.
 * - on_text runs on the calling thread, inside kiln_session_chat, while the session is in
 *   use. It must not call into the same session: kiln_session_chat, kiln_session_reset and
 *   kiln_session_free on it fail with -1 (see kiln_last_error) and change nothing. The same
 *   happens to a call that overlaps a running call from another thread; still, do not
 *   share a session between threads without your own lock, and never free a session that
 *   another thread may be using (that call could start after the memory is gone).
 * - kiln_last_error() is per thread. */
typedef struct kiln_session kiln_session;

/* Called with each piece of generated text (NUL-terminated UTF-8). */
typedef void (*kiln_text_fn)(const char *piece, void *user);

/* The message of the last failed call on this thread (never NULL). */
const char *kiln_last_error(void);

/* Opens a chat session on a linked model (&kiln_model) and its bundle directory (for
 * manifest.json, tokenizer.json and weights.bin). The library must come from the same
 * build as the bundle (their fingerprints are compared). n_threads <= 0 picks 2.
 * NULL on failure. */
kiln_session *kiln_session_new(const struct kiln_model_desc *model, const char *bundle_dir, int n_threads);

/* Frees a session; NULL is ignored. Returns 0, or -1 (and frees nothing) when the session
 * is in use, e.g. when called from its own on_text. */
int kiln_session_free(kiln_session *session);

/* Forgets the conversation. Returns 0, or -1 for a NULL or busy session. */
int kiln_session_reset(kiln_session *session);

/* One chat turn: appends user_message, streams the reply to on_text (may be NULL).
 * temperature 0 decodes greedily. Returns the number of generated tokens, or -1 (also
 * when the session is busy, e.g. called from its own on_text). */
int kiln_session_chat(kiln_session *session, const char *user_message, int max_tokens,
                      float temperature, uint64_t seed, kiln_text_fn on_text, void *user);

/* Offloading: after this, kiln_session_chat answers each turn on the device or by the
 * OpenAI-compatible server at url (http://host:port), as policy decides: "never", "always",
 * "complexity[:T]", "confidence[:K[:LOGP]]", or several joined by "+". api_key_env names the
 * environment variable holding the API key (NULL: none); timeout_ms (> 0) bounds each server
 * request; retries (>= 0) further attempts follow a failure that left no text with on_text.
 * A server failure never loses or repeats text: the device answers, or finishes the answer.
 * With offloading, kiln_session_chat returns the tokens generated on the device (0 for a
 * server answer). url NULL turns offloading off. Returns 0 or -1. */
int kiln_session_set_offload(kiln_session *session, const char *url, const char *policy,
                             const char *api_key_env, int timeout_ms, int retries);

/* Where the last answer came from: 0 device, 1 server, 2 device after a server failure;
 * -1 before any answer. The reason (figures and error kinds, never the prompt) is copied
 * into reason (NUL-terminated, at most reason_len bytes) when it is not NULL. */
int kiln_session_last_origin(kiln_session *session, char *reason, size_t reason_len);

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
