/* New-connection rate for scripts/bench: THREADS threads, each looping
 * connect -> send 1 byte -> read 1 byte -> close, for SECONDS.
 *
 *   crr ADDR PORT THREADS SECONDS
 *
 * Prints one JSON object: completed connections, failures (connect/send/recv errors, early
 * EOF, timeouts), rate, and connect-to-reply percentiles in microseconds. The first error
 * text is included to tell failure kinds apart.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct worker {
    pthread_t tid;
    double *lat;
    long n, cap, failures;
    char error[128];
};

static struct sockaddr_in addr;
static double deadline_us;

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fail(struct worker *w, const char *what, int err) {
    if (!w->failures) snprintf(w->error, sizeof w->error, "%s: %s", what, err ? strerror(err) : "EOF");
    w->failures++;
}

static void *run(void *arg) {
    struct worker *w = arg;
    struct timeval tv = {.tv_sec = 5};
    int one = 1;
    while (now_us() < deadline_us) {
        double t0 = now_us();
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) { fail(w, "socket", errno); continue; }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        char c = 'x';
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
            fail(w, "connect", errno);
        } else if (send(fd, &c, 1, MSG_NOSIGNAL) != 1) {
            fail(w, "send", errno);
        } else {
            ssize_t r = recv(fd, &c, 1, 0);
            if (r != 1) {
                fail(w, "recv", r < 0 ? errno : 0);
            } else {
                if (w->n == w->cap) {
                    w->cap = w->cap ? w->cap * 2 : 65536;
                    w->lat = realloc(w->lat, (size_t)w->cap * sizeof *w->lat);
                }
                w->lat[w->n++] = now_us() - t0;
            }
        }
        close(fd);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s ADDR PORT THREADS SECONDS\n", argv[0]);
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) return 2;
    int threads = atoi(argv[3]);
    double seconds = atof(argv[4]);
    struct worker *ws = calloc((size_t)threads, sizeof *ws);
    double t0 = now_us();
    deadline_us = t0 + seconds * 1e6;
    for (int i = 0; i < threads; i++) pthread_create(&ws[i].tid, NULL, run, &ws[i]);
    long total = 0, failures = 0;
    const char *error = "";
    for (int i = 0; i < threads; i++) {
        pthread_join(ws[i].tid, NULL);
        total += ws[i].n;
        failures += ws[i].failures;
        if (ws[i].failures && !*error) error = ws[i].error;
    }
    double wall = (now_us() - t0) / 1e6;
    double *all = malloc((size_t)(total ? total : 1) * sizeof *all);
    long k = 0;
    for (int i = 0; i < threads; i++) {
        memcpy(all + k, ws[i].lat, (size_t)ws[i].n * sizeof *all);
        k += ws[i].n;
    }
    qsort(all, (size_t)total, sizeof *all, cmp);
#define P(p) (total ? all[(long)((p) / 100.0 * (double)(total - 1) + 0.5)] : 0.0)
    printf("{\"conns\": %ld, \"failures\": %ld, \"wall_s\": %.3f, \"rate\": %.1f, "
           "\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"error\": \"%s\"}\n",
           total, failures, wall, total / wall, P(50), P(90), P(99), error);
    return 0;
}
