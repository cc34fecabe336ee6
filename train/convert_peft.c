/*
 * train/convert_peft.c - `moe convert --to-hf` of an adapter checkpoint: PEFT's adapter layout
 * (convert.h).  PEFT names a LoRA tensor after the module it adapts, under base_model.model.; the
 * routed experts of transformers' DeepseekV3 are modules mlp.experts.E.{gate,up,down}_proj, so a
 * stacked adapter [E, ...] is written as E tensors.
 */
#define _POSIX_C_SOURCE 200809L  /* unlink, rmdir */

#include "train/convert.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "launch/errmsg.h"
#include "model/lora.h"
#include "train/checkpoint.h"
#include "train/lora_run.h"

#define PEFT_PREFIX "base_model.model."
#define PEFT_NAME_LEN 192

/* PEFT's name of expert e's block of adapter tensor p (e = -1: not stacked) */
static void peft_name(char *out, size_t len, const struct param *p, int e)
{
	const char *at = e >= 0 ? strstr(p->name, ".mlp.experts.") : NULL;
	if (!at) {
		snprintf(out, len, PEFT_PREFIX "%s", p->name);
		return;
	}
	int head = (int)(at - p->name) + (int)strlen(".mlp.experts.");
	snprintf(out, len, PEFT_PREFIX "%.*s%d.%s", head, p->name, e, p->name + head);
}

/*
 * target_modules: PEFT matches a list entry against the end of every module's name, so "gate_proj"
 * would adapt the routed experts too.  A list when that is what the adapters cover, else the regular
 * expression PEFT takes instead (matched against the whole module name).
 */
static cJSON *target_modules(unsigned t)
{
	static const char *const ffn[3] = { "gate_proj", "up_proj", "down_proj" };
	int exact = 1;
	for (int k = 0; k < 3; k++) {
		int dense = !!(t & (1u << (LORA_GATE_PROJ + k))), routed = !!(t & (1u << (LORA_EXPERTS_GATE_PROJ + k)));
		exact &= dense == routed;
	}
	if (exact) {
		cJSON *a = cJSON_CreateArray();
		for (int k = 0; k < LORA_EXPERTS_GATE_PROJ; k++)
			if (t & (1u << k))
				cJSON_AddItemToArray(a, cJSON_CreateString(lora_target_name(k)));
		return a;
	}
	char re[512] = "", alt[256] = "";
	for (int k = 0; k <= LORA_O_PROJ; k++)
		if (t & (1u << k))
			snprintf(alt + strlen(alt), sizeof(alt) - strlen(alt), "%s%s", alt[0] ? "|" : "",
				 lora_target_name(k));
	if (alt[0])
		snprintf(re, sizeof(re), "self_attn\\.(%s)", alt);
	for (int k = 0; k < 3; k++) {
		const char *pre = NULL;
		int dense = !!(t & (1u << (LORA_GATE_PROJ + k))), routed = !!(t & (1u << (LORA_EXPERTS_GATE_PROJ + k)));
		if (dense && routed)
			pre = "mlp\\.(shared_experts\\.|experts\\.\\d+\\.)?";
		else if (dense)
			pre = "mlp\\.(shared_experts\\.)?";
		else if (routed)
			pre = "mlp\\.experts\\.\\d+\\.";
		if (pre)
			snprintf(re + strlen(re), sizeof(re) - strlen(re), "%s%s%s", re[0] ? "|" : "", pre, ffn[k]);
	}
	char full[600];
	snprintf(full, sizeof(full), ".*\\.(%s)", re);
	return cJSON_CreateString(full);
}

static char *adapter_config_json(const struct run_config *rc, const struct lora_spec *s)
{
	cJSON *o = cJSON_CreateObject();
	cJSON_AddStringToObject(o, "peft_type", "LORA");
	cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM");
	cJSON_AddNumberToObject(o, "r", s->rank);
	cJSON_AddNumberToObject(o, "lora_alpha", s->alpha);
	cJSON_AddNumberToObject(o, "lora_dropout", s->dropout);
	cJSON_AddItemToObject(o, "target_modules", target_modules(s->targets));
	cJSON_AddStringToObject(o, "base_model_name_or_path", lora_base_path(rc));
	cJSON_AddStringToObject(o, "bias", "none");
	cJSON_AddBoolToObject(o, "fan_in_fan_out", 0);
	cJSON_AddBoolToObject(o, "inference_mode", 1);
	cJSON_AddBoolToObject(o, "init_lora_weights", 1);
	cJSON_AddBoolToObject(o, "use_rslora", 0);
	cJSON_AddBoolToObject(o, "use_dora", 0);
	cJSON_AddNullToObject(o, "modules_to_save");
	convert_json_sort(o);
	char *txt = cJSON_Print(o);
	cJSON_Delete(o);
	return txt;
}

/* one spec per PEFT tensor: the view's tensors, stacked ones split per expert */
static struct st_spec *peft_specs(const struct moe_model *v, enum st_dtype dtype, char (**names)[PEFT_NAME_LEN],
				  int *n)
{
	int cap = 0;
	for (int i = 0; i < v->n_params; i++)
		cap += v->params[i].expert_stacked ? (int)v->params[i].shape[0] : 1;
	struct st_spec *sp = calloc(cap + 1, sizeof(*sp));
	*names = calloc(cap + 1, sizeof(**names));
	if (!sp || !*names) {
		free(sp);
		free(*names);
		return NULL;
	}
	*n = 0;
	for (int i = 0; i < v->n_params; i++) {
		const struct param *p = &v->params[i];
		int E = p->expert_stacked ? (int)p->shape[0] : 1;
		for (int e = 0; e < E; e++, (*n)++) {
			struct st_spec *s = &sp[*n];
			peft_name((*names)[*n], PEFT_NAME_LEN, p, p->expert_stacked ? e : -1);
			s->name = (*names)[*n];
			s->dtype = dtype;
			s->ndim = 2;
			s->shape[0] = p->shape[p->expert_stacked ? 1 : 0];
			s->shape[1] = p->shape[p->expert_stacked ? 2 : 1];
		}
	}
	return sp;
}

static int write_adapters(const struct moe_model *v, const char *path, enum st_dtype dtype, char *err,
			  size_t errlen)
{
	char (*names)[PEFT_NAME_LEN] = NULL;
	int n = 0;
	struct st_spec *sp = peft_specs(v, dtype, &names, &n);
	if (!sp)
		return set_err(err, errlen, "out of memory");
	static const char *const meta[] = { "format", "pt", NULL };
	struct st_writer *w = st_writer_open(path, sp, n, meta, err, errlen);
	int k = 0, bad = !w;
	for (int i = 0; !bad && i < v->n_params; i++) {
		const struct param *p = &v->params[i];
		int E = p->expert_stacked ? (int)p->shape[0] : 1;
		uint64_t per = p->numel / E;
		for (int e = 0; !bad && e < E; e++, k++)
			bad = st_writer_write(w, names[k], v->weights + p->offset + e * per, per, err, errlen) != 0;
	}
	if (bad && w)
		st_writer_abort(w);
	else if (!bad)
		bad = st_writer_close(w, err, errlen) != 0;
	free(sp);
	free(names);
	return bad ? -1 : 0;
}

int convert_lora_to_peft(const char *ckpt_path, const char *dir, enum st_dtype dtype, FILE *notes,
			 char *err, size_t errlen)
{
	struct run_config rc;
	config_defaults(&rc);
	if (checkpoint_read_header(ckpt_path, &rc, NULL, err, errlen))
		return -1;
	/* the adapters' table needs the model's layout, not its weights: those are never read */
	struct moe_model *m = model_create(&rc.model, 0, rc.model.n_routed_experts, err, errlen);
	struct lora *l = NULL;
	int ret = -1;
	char path[4200], *json = NULL;
	struct stat sb;
	int made_dir = stat(dir, &sb) != 0;
	if (!m || !(l = lora_attach(m, &rc.lora, 0, 1, err, errlen)) ||
	    checkpoint_load_model(ckpt_path, &l->view, err, errlen))
		goto out;
	if (convert_mkdir_p(dir, err, errlen) || convert_check_out_dir(dir, err, errlen))
		goto out;
	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
	if (write_adapters(&l->view, path, dtype, err, errlen))
		goto undo;
	json = adapter_config_json(&rc, &l->spec);
	snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
	if (!json ? set_err(err, errlen, "out of memory") : convert_write_text(path, json, err, errlen)) {
		snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
		goto undo;
	}
	print_note(notes, "%s: LoRA adapters in PEFT's layout (rank %d, %d adapted modules, %s), base %s", dir,
		   l->spec.rank, l->n, dtype == ST_BF16 ? "bf16" : "f32", lora_base_path(&rc));
	ret = 0;
	goto out;
undo:
	unlink(path);
	if (made_dir)
		rmdir(dir);
out:
	free(json);
	if (m)
		m->lora = NULL;
	lora_free(l);
	model_free(m);
	return ret;
}
