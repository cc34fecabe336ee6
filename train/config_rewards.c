/*
 * train/config_rewards.c - grpo.rewards, the list of weighted reward programs (config_rewards.h).
 */
#include "train/config_rewards.h"
#include "launch/errmsg.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The name goes into metric keys (reward/<name>) as it is: letters, digits, '_', '-', '.'. */
static bool name_ok(const char *s)
{
	if (!s[0])
		return false;
	for (; *s; s++)
		if (!(*s >= 'a' && *s <= 'z') && !(*s >= 'A' && *s <= 'Z') && !(*s >= '0' && *s <= '9') &&
		    !strchr("_-.", *s))
			return false;
	return true;
}

static int set_name(struct reward_config *r, const cJSON *v, int i, char *msg, size_t msglen)
{
	if (!cJSON_IsString(v))
		return set_err(msg, msglen, "[%d].name: expected a string, got %s", i, json_type(v));
	if (!name_ok(v->valuestring))
		return set_err(msg, msglen, "[%d].name: \"%.80s\" must be letters, digits, '_', '-' or '.' "
			       "(it names the metrics reward/<name>)", i, v->valuestring);
	if (strlen(v->valuestring) >= sizeof(r->name))
		return set_err(msg, msglen, "[%d].name: longer than %zu bytes", i, sizeof(r->name) - 1);
	snprintf(r->name, sizeof(r->name), "%s", v->valuestring);
	return 0;
}

static int set_cmd(struct reward_config *r, const cJSON *v, int i, char *msg, size_t msglen)
{
	const cJSON *e;
	int n = 0;

	if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) < 1)
		return set_err(msg, msglen, "[%d].cmd: expected a non-empty array of strings such as "
			       "[\"python3\", \"reward.py\"], got %s", i, json_type(v));
	if (cJSON_GetArraySize(v) > CFG_MAX_ARGV)
		return set_err(msg, msglen, "[%d].cmd: more than %d arguments", i, CFG_MAX_ARGV);
	cJSON_ArrayForEach(e, v) {
		if (!cJSON_IsString(e))
			return set_err(msg, msglen, "[%d].cmd: argument %d: expected a string, got %s", i, n,
				       json_type(e));
		if (strlen(e->valuestring) >= CFG_STR)
			return set_err(msg, msglen, "[%d].cmd: argument %d is longer than %d bytes", i, n,
				       CFG_STR - 1);
		snprintf(r->cmd[n++], CFG_STR, "%s", e->valuestring);
	}
	if (!r->cmd[0][0])
		return set_err(msg, msglen, "[%d].cmd: the program (argument 0) is empty", i);
	r->cmd_argc = n;
	return 0;
}

static int set_number(double *dst, const cJSON *v, int i, const char *key, bool positive, char *msg,
		      size_t msglen)
{
	if (!cJSON_IsNumber(v))
		return set_err(msg, msglen, "[%d].%s: expected a number, got %s", i, key, json_type(v));
	if (!isfinite(v->valuedouble))
		return set_err(msg, msglen, "[%d].%s: number out of range", i, key);
	if (positive && !(v->valuedouble > 0))
		return set_err(msg, msglen, "[%d].%s=%g must be > 0", i, key, v->valuedouble);
	*dst = v->valuedouble;
	return 0;
}

static int set_entry(struct reward_config *r, const cJSON *o, int i, char *msg, size_t msglen)
{
	const cJSON *m;
	int rc = 0;

	if (!cJSON_IsObject(o))
		return set_err(msg, msglen, "[%d]: expected an object {\"name\", \"cmd\", \"weight\", "
			       "\"timeout_s\"}, got %s", i, json_type(o));
	memset(r, 0, sizeof(*r));
	r->weight = 1.0;
	cJSON_ArrayForEach(m, o) {
		for (const cJSON *s = o->child; s != m; s = s->next)
			if (!strcmp(s->string, m->string))
				return set_err(msg, msglen, "[%d]: duplicate key %s", i, m->string);
		if (!strcmp(m->string, "name"))
			rc = set_name(r, m, i, msg, msglen);
		else if (!strcmp(m->string, "cmd"))
			rc = set_cmd(r, m, i, msg, msglen);
		else if (!strcmp(m->string, "weight"))
			rc = set_number(&r->weight, m, i, "weight", false, msg, msglen);
		else if (!strcmp(m->string, "timeout_s"))
			rc = set_number(&r->timeout_s, m, i, "timeout_s", true, msg, msglen);
		else
			rc = set_err(msg, msglen, "[%d]: unknown key %.64s (an entry takes name, cmd, weight, "
				     "timeout_s)", i, m->string);
		if (rc)
			return -1;
	}
	if (!r->name[0])
		return set_err(msg, msglen, "[%d]: no \"name\"", i);
	if (!r->cmd_argc)
		return set_err(msg, msglen, "[%d] (%s): no \"cmd\"", i, r->name);
	return 0;
}

int config_rewards_set(struct grpo_config *g, const cJSON *v, char *msg, size_t msglen)
{
	struct reward_config *list;
	const cJSON *e;
	int n = 0;

	if (!cJSON_IsArray(v))
		return set_err(msg, msglen, "expected an array of {\"name\", \"cmd\", \"weight\", "
			       "\"timeout_s\"} objects, got %s", json_type(v));
	if (cJSON_GetArraySize(v) > CFG_MAX_REWARDS)
		return set_err(msg, msglen, "%d programs, at most %d", cJSON_GetArraySize(v),
			       CFG_MAX_REWARDS);
	list = calloc(CFG_MAX_REWARDS, sizeof(*list));
	if (!list)
		return set_err(msg, msglen, "out of memory");
	cJSON_ArrayForEach(e, v) {
		if (set_entry(&list[n], e, n, msg, msglen)) {
			free(list);
			return -1;
		}
		n++;
	}
	memcpy(g->rewards, list, sizeof(g->rewards));
	g->n_rewards = n;
	free(list);
	return 0;
}

/* Shortest %g form that reads back as exactly d. */
static void fmt_num(char *buf, size_t n, double d)
{
	for (int prec = 15; prec <= 17; prec++) {
		snprintf(buf, n, "%.*g", prec, d);
		if (strtod(buf, NULL) == d)
			return;
	}
}

static cJSON *entry_json(const struct reward_config *r)
{
	cJSON *o = cJSON_CreateObject(), *cmd = cJSON_CreateArray();
	char num[40];

	if (!o || !cmd || !cJSON_AddStringToObject(o, "name", r->name) || !cJSON_AddItemToObject(o, "cmd", cmd))
		goto oom;
	for (int i = 0; i < r->cmd_argc; i++)
		if (!cJSON_AddItemToArray(cmd, cJSON_CreateString(r->cmd[i])))
			goto oom_o;
	fmt_num(num, sizeof(num), r->weight);
	if (!cJSON_AddRawToObject(o, "weight", num))
		goto oom_o;
	fmt_num(num, sizeof(num), r->timeout_s);
	if (r->timeout_s > 0 && !cJSON_AddRawToObject(o, "timeout_s", num))
		goto oom_o;
	return o;
oom:
	cJSON_Delete(cmd);
oom_o:
	cJSON_Delete(o);
	return NULL;
}

cJSON *config_rewards_json(const struct grpo_config *g)
{
	cJSON *a = cJSON_CreateArray();

	for (int i = 0; a && i < g->n_rewards; i++) {
		cJSON *o = entry_json(&g->rewards[i]);

		if (!o || !cJSON_AddItemToArray(a, o)) {
			cJSON_Delete(o);
			cJSON_Delete(a);
			return NULL;
		}
	}
	return a;
}

static bool entry_equal(const struct reward_config *a, const struct reward_config *b)
{
	if (strcmp(a->name, b->name) || a->cmd_argc != b->cmd_argc ||
	    memcmp(&a->weight, &b->weight, sizeof(double)) || memcmp(&a->timeout_s, &b->timeout_s, sizeof(double)))
		return false;
	for (int i = 0; i < a->cmd_argc; i++)
		if (strcmp(a->cmd[i], b->cmd[i]))
			return false;
	return true;
}

bool config_rewards_equal(const struct grpo_config *a, const struct grpo_config *b)
{
	if (a->n_rewards != b->n_rewards)
		return false;
	for (int i = 0; i < a->n_rewards; i++)
		if (!entry_equal(&a->rewards[i], &b->rewards[i]))
			return false;
	return true;
}

int config_rewards_validate(const struct grpo_config *g, char *err, size_t errlen)
{
	if (g->n_rewards < 0 || g->n_rewards > CFG_MAX_REWARDS)
		return set_err(err, errlen, "grpo.rewards has %d programs (at most %d)", g->n_rewards,
			       CFG_MAX_REWARDS);
	if (g->n_rewards > 0 && g->reward_cmd_argc > 0)
		return set_err(err, errlen, "grpo.rewards and grpo.reward_cmd are both given: list every "
			       "program in grpo.rewards (grpo.reward_cmd is the one program of weight 1)");
	for (int i = 0; i < g->n_rewards; i++)
		for (int j = 0; j < i; j++)
			if (!strcmp(g->rewards[i].name, g->rewards[j].name))
				return set_err(err, errlen, "grpo.rewards[%d].name: \"%s\" is also the name of "
					       "grpo.rewards[%d] (names must differ)", i, g->rewards[i].name, j);
	return 0;
}
