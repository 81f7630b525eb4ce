/* Idle connections for scripts/bench: open COUNT connections, one 1-byte round trip on each,
 * then hold them open without traffic until stdin closes (or a line arrives).
 *
 *   idle ADDR PORT COUNT
 *
 * Prints {"open": N, "failures": F, "error": "..."} once all are set up, then waits.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ADDR PORT COUNT\n", argv[0]);
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
    long count = atol(argv[3]), open_ = 0, failures = 0;
    char error[128] = "";
    int *fds = calloc((size_t)count, sizeof *fds);
    struct timeval tv = {.tv_sec = 10};
    int one = 1;
    for (long i = 0; i < count; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char c = 'x';
        const char *what = NULL;
        ssize_t r = 0;
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) what = "connect";
        else if (send(fd, &c, 1, MSG_NOSIGNAL) != 1) what = "send";
        else if ((r = recv(fd, &c, 1, 0)) != 1) what = "recv";
        if (what) {
            if (!failures) snprintf(error, sizeof error, "%s: %s", what, r == 0 && !strcmp(what, "recv") ? "EOF" : strerror(errno));
            failures++;
            close(fd);
            fds[i] = -1;
        } else {
            fds[i] = fd;
            open_++;
        }
    }
    printf("{\"open\": %ld, \"failures\": %ld, \"error\": \"%s\"}\n", open_, failures, error);
    fflush(stdout);
    char line[16];
    (void)!fgets(line, sizeof line, stdin);
    for (long i = 0; i < count; i++)
        if (fds[i] >= 0) close(fds[i]);
    return 0;
}
