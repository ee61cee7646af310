/* c-chat: chat with a kiln-compiled model from C, through the runtime's C API.
 *
 * Usage:
 *   c-chat BUNDLE_DIR "PROMPT"   answer one prompt and exit
 *   c-chat BUNDLE_DIR            interactive: one turn per line of stdin; an empty line or
 *                                EOF quits (the conversation is kept across turns)
 *
 * Replies are decoded greedily (temperature 0, at most 256 tokens) and streamed to stdout
 * as they are generated. On failure the runtime's message goes to stderr and the exit
 * status is 1.
 *
 * With KILN_OFFLOAD_URL set (an OpenAI-compatible server, e.g. `cargo xtask serve`), turns are
 * answered on the device or by that server as KILN_OFFLOAD_POLICY says (default
 * "complexity"); after each answer stderr says where it came from and why.
 *
 * Build by hand (`cargo xtask c-chat` does the same), from the workspace root, with
 * BUNDLE=bundles/x86_64-unknown-linux-gnu made by `cargo xtask build-model`:
 *
 *   cargo build --release -p runtime --lib          # target/release/libruntime.a
 *   cc -std=c11 -O2 -Wall -Wextra -Werror \
 *      -I runtime/include -I $BUNDLE/include \
 *      examples/c-chat/main.c $BUNDLE/lib/libkiln_model.a target/release/libruntime.a \
 *      -lpthread -ldl -lm -o c-chat
 *   ./c-chat $BUNDLE "What is the capital of France?"
 *
 * The model library must come before libruntime.a on the command line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kiln.h"       /* the runtime: kiln_session_new, kiln_session_chat, ... */
#include "kiln_model.h" /* the compiled model: extern const struct kiln_model_desc kiln_model */

enum { MAX_TOKENS = 256, N_THREADS = 2 };

/* Streams each piece of the reply to stdout as soon as it is generated. */
static void on_text(const char *piece, void *user) {
    (void)user;
    fputs(piece, stdout);
    fflush(stdout);
}

/* One chat turn; returns 0, or -1 after printing the runtime's error. */
static int chat(kiln_session *session, const char *message, int offloading) {
    int n = kiln_session_chat(session, message, MAX_TOKENS, 0.0f, 0, on_text, NULL);
    fputs("\n", stdout);
    fflush(stdout);
    if (n < 0) {
        fprintf(stderr, "c-chat: %s\n", kiln_last_error());
        return -1;
    }
    if (offloading) {
        static const char *const where[] = {"device", "server", "fallback"};
        char reason[256];
        int origin = kiln_session_last_origin(session, reason, sizeof reason);
        if (origin >= 0 && origin <= 2) {
            fprintf(stderr, "[%s: %s]\n", where[origin], reason);
        }
    }
    return 0;
}

/* Reads one line of any length from `in` without its newline, into a malloc'd buffer.
 * Returns NULL at EOF with nothing read (or when out of memory). */
static char *read_line(FILE *in) {
    size_t cap = 256, len = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        return NULL;
    }
    for (;;) {
        if (fgets(buf + len, (int)(cap - len), in) == NULL) {
            if (len == 0) {
                free(buf);
                return NULL;
            }
            break; /* EOF after a last line without a newline */
        }
        len += strlen(buf + len);
        if (len > 0 && buf[len - 1] == '\n') {
            buf[--len] = '\0';
            break;
        }
        if (len + 1 == cap) { /* the line is longer than the buffer: grow it */
            char *bigger = realloc(buf, cap * 2);
            if (bigger == NULL) {
                free(buf);
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
    }
    if (len > 0 && buf[len - 1] == '\r') {
        buf[--len] = '\0';
    }
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s BUNDLE_DIR [PROMPT]\n", argv[0]);
        return 2;
    }
    const char *bundle_dir = argv[1];

    kiln_session *session = kiln_session_new(&kiln_model, bundle_dir, N_THREADS);
    if (session == NULL) {
        fprintf(stderr, "c-chat: %s\n", kiln_last_error());
        return 1;
    }

    const char *offload_url = getenv("KILN_OFFLOAD_URL");
    int offloading = offload_url != NULL && offload_url[0] != '\0';
    if (offloading) {
        const char *policy = getenv("KILN_OFFLOAD_POLICY");
        if (kiln_session_set_offload(session, offload_url, policy ? policy : "complexity", "KILN_OFFLOAD_API_KEY",
                                     30000, 2) != 0) {
            fprintf(stderr, "c-chat: %s\n", kiln_last_error());
            kiln_session_free(session);
            return 1;
        }
    }

    int status = 0;
    if (argc == 3) {
        status = chat(session, argv[2], offloading);
    } else {
        for (;;) {
            fputs("> ", stdout);
            fflush(stdout);
            char *line = read_line(stdin);
            if (line == NULL || line[0] == '\0') {
                free(line);
                break;
            }
            status = chat(session, line, offloading);
            free(line);
            if (status != 0) {
                break;
            }
        }
    }

    kiln_session_free(session);
    return status == 0 ? 0 : 1;
}
