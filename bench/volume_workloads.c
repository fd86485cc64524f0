/* The file workloads of issue 4's benchmark, on the directory pre-opened at /data:
 *   seq    64 MiB written in 64 KiB chunks, fsync, then read back in 64 KiB chunks
 *   files  2,000 files of 4 KiB created (each written and closed), stat'd, then deleted
 *   small  200,000 16-byte writes to one file, then fsync
 * Exits non-zero (with a message) if anything fails or reads back wrong. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int fail(const char *what) { perror(what); return 1; }

static int seq(void) {
    static char chunk[65536];
    for (size_t i = 0; i < sizeof chunk; i++) chunk[i] = (char)(i * 7);
    int fd = open("/data/seq.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail("open");
    for (int i = 0; i < 1024; i++) {
        chunk[0] = (char)i;
        if (write(fd, chunk, sizeof chunk) != (ssize_t)sizeof chunk) return fail("write");
    }
    if (fsync(fd) != 0) return fail("fsync");
    if (lseek(fd, 0, SEEK_SET) != 0) return fail("lseek");
    static char back[65536];
    for (int i = 0; i < 1024; i++) {
        if (read(fd, back, sizeof back) != (ssize_t)sizeof back) return fail("read");
        if (back[0] != (char)i || memcmp(back + 1, chunk + 1, sizeof back - 1) != 0) {
            fprintf(stderr, "chunk %d read back wrong\n", i);
            return 1;
        }
    }
    return close(fd) == 0 ? 0 : fail("close");
}

static int files(void) {
    static char block[4096];
    memset(block, 'f', sizeof block);
    char name[64];
    if (mkdir("/data/many", 0755) != 0) return fail("mkdir");
    for (int i = 0; i < 2000; i++) {
        snprintf(name, sizeof name, "/data/many/file-%04d", i);
        int fd = open(name, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) return fail("create");
        if (write(fd, block, sizeof block) != (ssize_t)sizeof block) return fail("write");
        if (close(fd) != 0) return fail("close");
    }
    struct stat info;
    for (int i = 0; i < 2000; i++) {
        snprintf(name, sizeof name, "/data/many/file-%04d", i);
        if (stat(name, &info) != 0 || info.st_size != 4096) return fail("stat");
    }
    for (int i = 0; i < 2000; i++) {
        snprintf(name, sizeof name, "/data/many/file-%04d", i);
        if (unlink(name) != 0) return fail("unlink");
    }
    return rmdir("/data/many") == 0 ? 0 : fail("rmdir");
}

static int small(void) {
    int fd = open("/data/small.log", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail("open");
    char record[17];
    for (int i = 0; i < 200000; i++) {
        snprintf(record, sizeof record, "%015d\n", i);
        if (write(fd, record, 16) != 16) return fail("write");
    }
    if (fsync(fd) != 0) return fail("fsync");
    return close(fd) == 0 ? 0 : fail("close");
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (strcmp(argv[1], "seq") == 0) return seq();
    if (strcmp(argv[1], "files") == 0) return files();
    if (strcmp(argv[1], "small") == 0) return small();
    if (strcmp(argv[1], "none") == 0) return 0;
    return 2;
}
