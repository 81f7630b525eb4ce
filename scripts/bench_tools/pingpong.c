/* Request/response latency for scripts/bench: one connection, SIZE-byte ping-pong.
 *
 *   pingpong ADDR PORT ROUNDS WARMUP [SIZE]
 *
 * Connects (TCP_NODELAY), runs WARMUP untimed round trips, then ROUNDS timed ones, and prints
 * one JSON object: percentiles in microseconds, the timed wall time, and failures (0 or 1).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *v, long n, double p) {
    long i = (long)(p / 100.0 * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static int roundtrip(int fd, char *buf, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t w = send(fd, buf + done, size - done, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        done += (size_t)w;
    }
    done = 0;
    while (done < size) {
        ssize_t r = recv(fd, buf + done, size - done, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s ADDR PORT ROUNDS WARMUP [SIZE]\n", argv[0]);
        return 2;
    }
    long rounds = atol(argv[3]), warmup = atol(argv[4]);
    size_t size = argc > 5 ? (size_t)atol(argv[5]) : 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        printf("{\"failures\": 1, \"error\": \"connect: %s\"}\n", strerror(errno));
        return 1;
    }
    char *buf = calloc(1, size);
    memset(buf, 'x', size);
    double *lat = calloc((size_t)rounds, sizeof *lat);
    for (long i = 0; i < warmup; i++) {
        if (roundtrip(fd, buf, size) < 0) {
            printf("{\"failures\": 1, \"error\": \"warm-up round %ld: %s\"}\n", i, strerror(errno));
            return 1;
        }
    }
    double t0 = now_us();
    for (long i = 0; i < rounds; i++) {
        double s = now_us();
        if (roundtrip(fd, buf, size) < 0) {
            printf("{\"failures\": 1, \"error\": \"round %ld: %s\"}\n", i, strerror(errno));
            return 1;
        }
        lat[i] = now_us() - s;
    }
    double wall = now_us() - t0;
    close(fd);
    qsort(lat, (size_t)rounds, sizeof *lat, cmp);
    double sum = 0;
    for (long i = 0; i < rounds; i++) sum += lat[i];
    printf("{\"failures\": 0, \"rounds\": %ld, \"size\": %zu, \"wall_us\": %.1f, \"mean\": %.2f, "
           "\"p50\": %.2f, \"p90\": %.2f, \"p99\": %.2f, \"p999\": %.2f, \"max\": %.2f}\n",
           rounds, size, wall, sum / rounds, pct(lat, rounds, 50), pct(lat, rounds, 90),
           pct(lat, rounds, 99), pct(lat, rounds, 99.9), lat[rounds - 1]);
    return 0;
}
