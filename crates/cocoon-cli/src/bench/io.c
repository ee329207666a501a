/* File I/O for `cocoon bench` (busybox has no fio): sequential write
 * (then fsync) and read of SIZE MiB in 1 MiB blocks, then OPS random 4 KiB
 * writes (then fsync) and OPS random 4 KiB reads, on FILE. Before each
 * read pass the file's cached pages are dropped (fsync, then
 * POSIX_FADV_DONTNEED), so reads reach the file system where it allows.
 * Prints key=value lines. Built static, it runs in any container.
 *   bench-io FILE SIZE_MIB OPS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

static void drop(int fd) {
  if (fsync(fd)) die("fsync");
  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: bench-io FILE SIZE_MIB OPS\n");
    return 2;
  }
  const char *path = argv[1];
  long mib = atol(argv[2]), ops = atol(argv[3]);
  size_t block = 1 << 20;
  char *buf = malloc(block);
  if (!buf) die("malloc");
  memset(buf, 0xa5, block);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) die(path);

  double t = now();
  for (long i = 0; i < mib; i++)
    if (write(fd, buf, block) != (ssize_t)block) die("write");
  if (fsync(fd)) die("fsync");
  printf("seq_write_mib_s=%.1f\n", mib / (now() - t));

  drop(fd);
  t = now();
  if (lseek(fd, 0, SEEK_SET) < 0) die("lseek");
  for (long i = 0; i < mib; i++)
    if (read(fd, buf, block) != (ssize_t)block) die("read");
  printf("seq_read_mib_s=%.1f\n", mib / (now() - t));

  long pages = mib * 256;
  unsigned long x = 88172645463325252UL;
#define NEXT() (x ^= x << 13, x ^= x >> 7, x ^= x << 17, x)
  t = now();
  for (long i = 0; i < ops; i++)
    if (pwrite(fd, buf, 4096, (off_t)(NEXT() % pages) * 4096) != 4096) die("pwrite");
  if (fsync(fd)) die("fsync");
  printf("rand_write_iops=%.0f\n", ops / (now() - t));

  drop(fd);
  t = now();
  for (long i = 0; i < ops; i++)
    if (pread(fd, buf, 4096, (off_t)(NEXT() % pages) * 4096) != 4096) die("pread");
  printf("rand_read_iops=%.0f\n", ops / (now() - t));
  close(fd);
  unlink(path);
  return 0;
}
