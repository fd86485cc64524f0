/* keep demo's guest: a tiny HTTPS guestbook, an ordinary WASI program (wasm32-wasi, C).
 *
 *     guestbook LISTENER [FILE]
 *
 * Serves HTTP/1.1 on the pre-opened socket named LISTENER (FD_NAMES, as in Enarx; the keep
 * terminates TLS, so this program only ever sees plaintext). FILE (default
 * /data/guestbook.txt) lives on whatever the keep pre-opened at /data: in `keep demo`, an
 * encrypted volume.
 *
 *     POST /entries   appends the request body as one line to FILE, fsyncs, answers 201
 *     GET /entries    answers 200 with FILE's contents
 *
 * One request per connection. It serves until the keep stops (accept() then fails with
 * ECANCELED) and exits 0; any other failure exits 1 with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define REQUEST_LIMIT 16384

static const char *file_name = "/data/guestbook.txt";
static int stored = 0;

/* The fd FD_NAMES gives `name`, or -1. */
static int fd_named(const char *name) {
    const char *names = getenv("FD_NAMES");
    if (!names) return -1;
    int fd = 0;
    for (const char *start = names;; fd++) {
        const char *end = strchr(start, ':');
        size_t length = end ? (size_t)(end - start) : strlen(start);
        if (length == strlen(name) && strncmp(start, name, length) == 0) return fd;
        if (!end) return -1;
        start = end + 1;
    }
}

static int send_all(int fd, const char *data, size_t length) {
    while (length > 0) {
        ssize_t sent = send(fd, data, length, 0);
        if (sent < 0) return -1;
        data += sent;
        length -= (size_t)sent;
    }
    return 0;
}

static void respond(int fd, const char *status, const char *body, size_t body_length) {
    char head[256];
    int head_length = snprintf(head, sizeof head,
                               "HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                               "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                               status, body_length);
    if (send_all(fd, head, (size_t)head_length) < 0 || send_all(fd, body, body_length) < 0)
        fprintf(stderr, "guestbook: send: %s\n", strerror(errno));
}

/* Appends `entry` and a newline to the guestbook and makes it durable (fsync). */
static int append_entry(const char *entry, size_t length) {
    FILE *book = fopen(file_name, "a");
    if (!book) return -1;
    int failed = fwrite(entry, 1, length, book) != length || fputc('\n', book) == EOF ||
                 fflush(book) != 0 || fsync(fileno(book)) != 0;
    int saved = errno;
    fclose(book);
    errno = saved;
    return failed ? -1 : 0;
}

static void handle(int fd) {
    static char request[REQUEST_LIMIT + 1];
    size_t length = 0;
    char *body = NULL;
    size_t content_length = 0;
    for (;;) {  /* the head, then Content-Length bytes of body */
        if (body && length - (size_t)(body - request) >= content_length) break;
        if (length == REQUEST_LIMIT) {
            respond(fd, "413 Payload Too Large", "too large\n", 10);
            return;
        }
        ssize_t got = recv(fd, request + length, REQUEST_LIMIT - length, 0);
        if (got <= 0) break;
        length += (size_t)got;
        request[length] = 0;
        if (!body) {
            char *end = strstr(request, "\r\n\r\n");
            if (!end) continue;
            body = end + 4;
            const char *header = strcasestr(request, "\r\nContent-Length:");
            if (header && header < end) content_length = strtoul(header + 17, NULL, 10);
        }
    }
    request[length] = 0;
    char method[8] = "", path[256] = "";
    sscanf(request, "%7s %255s", method, path);
    if (strcmp(path, "/entries") != 0) {
        respond(fd, "404 Not Found", "no such page\n", 13);
    } else if (strcmp(method, "POST") == 0 && body) {
        size_t entry_length = length - (size_t)(body - request);
        if (entry_length > content_length) entry_length = content_length;
        while (entry_length && (body[entry_length - 1] == '\n' || body[entry_length - 1] == '\r'))
            entry_length--;
        if (append_entry(body, entry_length) != 0) {
            fprintf(stderr, "guestbook: cannot store an entry in %s: %s\n", file_name, strerror(errno));
            respond(fd, "500 Internal Server Error", "cannot store\n", 13);
            return;
        }
        stored++;
        printf("stored entry %d (%zu bytes): appended to %s, fsync'd\n", stored, entry_length,
               file_name);
        fflush(stdout);  /* before answering, so the log line precedes the client's next step */
        char reply[64];
        int reply_length = snprintf(reply, sizeof reply, "stored entry %d\n", stored);
        respond(fd, "201 Created", reply, (size_t)reply_length);
    } else if (strcmp(method, "GET") == 0) {
        static char contents[REQUEST_LIMIT];
        size_t size = 0;
        FILE *book = fopen(file_name, "r");
        if (book) {
            size = fread(contents, 1, sizeof contents, book);
            fclose(book);
        }
        printf("read %s back (%zu bytes)\n", file_name, size);
        fflush(stdout);
        respond(fd, "200 OK", contents, size);
    } else {
        respond(fd, "405 Method Not Allowed", "use GET or POST\n", 16);
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: guestbook LISTENER [FILE]\n");
        return 2;
    }
    if (argc == 3) file_name = argv[2];
    int listener = fd_named(argv[1]);
    if (listener < 0) {
        fprintf(stderr, "guestbook: no socket named %s in FD_NAMES\n", argv[1]);
        return 2;
    }
    printf("serving on fd %d (\"%s\"), storing entries in %s\n", listener, argv[1], file_name);
    fflush(stdout);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno == ECANCELED) {
                printf("the keep is stopping: %d entries stored, exiting\n", stored);
                return 0;
            }
            fprintf(stderr, "guestbook: accept: %s\n", strerror(errno));
            return 1;
        }
        handle(fd);
        shutdown(fd, SHUT_WR);
        close(fd);
    }
}
