/* The host-call benchmark: COUNT write() calls of 16 bytes each, straight through wasi-libc to
 * fd_write (no stdio buffering). usage: fd_write_loop COUNT [PATH]  (no PATH: writes to stdout) */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs("usage: fd_write_loop COUNT [PATH]\n", stderr);
        return 2;
    }
    long count = atol(argv[1]);
    int fd = 1;
    if (argc > 2) {
        fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) {
            perror("open");
            return 1;
        }
    }
    static const char record[16] = "0123456789abcde\n";
    for (long i = 0; i < count; i++) {
        if (write(fd, record, sizeof record) != (ssize_t)sizeof record) {
            perror("write");
            return 1;
        }
    }
    if (fd != 1) close(fd);
    return 0;
}
