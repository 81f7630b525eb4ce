/* Echo server for scripts/bench: epoll, one thread, any number of ports.
 *
 *   echo ADDR PORT [PORT ...]
 *
 * Echoes every byte back, with TCP_NODELAY. On the peer's FIN it flushes what is pending and
 * closes. Prints "ready" once every port listens. Idle connections cost one fd and a small
 * struct, so it can hold thousands of them for the idle-memory scenario.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define MAXPORTS 16

struct conn {
    int fd;
    int listener;
    size_t off, len; /* pending output in buf[off..len) */
    int eof;
    char *buf;
};

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void close_conn(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->buf);
    free(c);
}

/* Flush pending output; 1 when everything is written, 0 when it would block, -1 on error. */
static int flush(struct conn *c) {
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            if (errno == EINTR) continue;
            return -1;
        }
        c->off += (size_t)n;
    }
    c->off = c->len = 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ADDR PORT [PORT ...]\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    int nports = argc - 2 > MAXPORTS ? MAXPORTS : argc - 2;
    for (int i = 0; i < nports; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[i + 2]))};
        if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) die("inet_pton");
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
        if (listen(fd, 4096) < 0) die("listen");
        struct conn *l = calloc(1, sizeof *l);
        l->fd = fd;
        l->listener = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    printf("ready\n");
    fflush(stdout);

    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->listener) {
                for (;;) {
                    int fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *k = calloc(1, sizeof *k);
                    k->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = k};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                int r = flush(c);
                if (r < 0) { close_conn(ep, c); continue; }
                if (r == 0) continue;
                if (c->eof) { close_conn(ep, c); continue; }
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
            }
            if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                if (c->len) continue; /* waiting for EPOLLOUT */
                if (!c->buf) c->buf = malloc(BUF);
                ssize_t r = recv(c->fd, c->buf, BUF, 0);
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                if (r <= 0) { close_conn(ep, c); continue; }
                c->off = 0;
                c->len = (size_t)r;
                int f = flush(c);
                if (f < 0) { close_conn(ep, c); continue; }
                if (f == 0) {
                    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
        }
    }
}
